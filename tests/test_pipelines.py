"""DALI pipelines on CPU: numerics against independent references, augmentation, resume, layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dali_pipelines import sampling
from dali_pipelines.sampling import Shard
from dali_pipelines.loader import DaliLoader
from dali_pipelines.spec import LoaderSpec, Preprocessing

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Inception-ResNet-V2's pretrained config


def _reference(images_hwc_uint8: np.ndarray, size: int) -> torch.Tensor:
    """torch bilinear (half-pixel centres, as DALI's linear filter) + normalization."""
    x = torch.from_numpy(np.array(images_hwc_uint8)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.round().clamp(0, 255)  # DALI's resize keeps uint8
    return (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _eval_loader(store, split, size, **spec_kw) -> DaliLoader:
    data = store.split(split)
    return DaliLoader(labels=data.labels, images=data.images, files=data.files, train=False, shard=Shard(batch_size=50),
                      spec=LoaderSpec(Preprocessing(size, MEAN, STD), num_threads=2, **spec_kw))


@pytest.mark.parametrize("size", [299, 75])
def test_resize_and_normalize_match_torch_on_real_cifar(cifar_store, size):
    loader = _eval_loader(cifar_store, "test", size)
    images, labels = next(iter(loader))
    ref = _reference(cifar_store.split("test").images[:50], size)
    assert images.shape == (50, 3, size, size) and images.dtype == torch.float32
    assert torch.equal(labels, torch.from_numpy(cifar_store.split("test").labels[:50]))
    # Tolerance: one grey level of 255 (2/255 in normalized units) from rounding inside the filters.
    assert (images - ref).abs().max() <= 2 / 255 + 1e-6
    assert (images - ref).abs().mean() < 0.5 / 255


def test_decode_resize_normalize_match_pil_and_torch_on_real_jpegs(folder_store):
    loader = _eval_loader(folder_store, "test", 96)
    images, _ = next(iter(loader))
    files = folder_store.split("test").files[:50]
    ref = _reference(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), 96)
    # JPEG decoders (DALI's vs PIL's libjpeg) may differ by a few levels on some pixels.
    assert (images - ref).abs().mean() < 1.5 / 255
    assert (images - ref).abs().max() < 24 / 255


def test_train_augmentation_is_the_planned_shift_and_flip(cifar_store):
    data = cifar_store.split("train")
    loader = DaliLoader(labels=data.labels, images=data.images, train=True, shard=Shard(batch_size=32, seed=7),
                        spec=LoaderSpec(Preprocessing(32, (0, 0, 0), (1, 1, 1)), num_threads=2))
    loader.set_epoch(2)
    images, labels = next(iter(loader))
    order = sampling.epoch_permutation(len(data), 7, 2)
    aug = sampling.epoch_augmentation(len(data), 7, 2)
    for i in range(32):
        src = np.pad(data.images[order[i]], ((4, 4), (4, 4), (0, 0)))  # zero padding
        dx, dy = (aug.shift[i] * 32).round().astype(int)
        crop = src[4 + dy: 4 + dy + 32, 4 + dx: 4 + dx + 32]
        if aug.flip[i]:
            crop = crop[:, ::-1]
        assert np.array_equal((images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), crop), i
        assert labels[i] == data.labels[order[i]]


def _collect(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_resume_mid_epoch_yields_what_an_uninterrupted_run_would(cifar_store):
    data = cifar_store.split("train")
    make = lambda: DaliLoader(labels=data.labels, images=data.images, train=True, # noqa: E731
                              spec=LoaderSpec(Preprocessing(40, MEAN, STD), num_threads=2), shard=Shard(batch_size=64,
                                                                                                        seed=3))
    uninterrupted = make()
    epoch0, epoch1 = _collect(uninterrupted, 0), _collect(uninterrupted, 1)
    assert len(epoch0) == len(uninterrupted) == 29 and sum(len(y) for _, y in epoch0) == 1800
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # reshuffled
    resumed = make()
    first = next(iter(_iter_from(resumed, 1, 5 * 64)))  # abandon epoch 1 after one batch...
    assert torch.equal(first[0], epoch1[5][0])
    tail = _collect(resumed, 1, 17 * 64)  # ...and restart it at sample 17 x 64 (batch 17) in the same loader
    assert len(tail) == len(epoch1) - 17
    for (x, y), (rx, ry) in zip(epoch1[17:], tail):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def _iter_from(loader, epoch, start):
    loader.set_epoch(epoch, start)
    return iter(loader)


def test_two_rank_loaders_split_the_epoch(cifar_store):
    data = cifar_store.split("train")
    seen = []
    for rank in range(2):
        loader = DaliLoader(labels=np.arange(len(data)), images=data.images, train=True,
                            spec=LoaderSpec(Preprocessing(32, MEAN, STD), num_threads=2),
                            shard=Shard(batch_size=64, seed=0, rank=rank, world_size=2))
        batches = _collect(loader, 4)
        assert len(batches) == len(loader) == 15
        seen += [int(i) for _, y in batches for i in y]
    assert sorted(seen) == list(range(len(data)))


def test_channels_last_and_dtypes(cifar_store):
    base = next(iter(_eval_loader(cifar_store, "val", 48)))[0]
    nhwc = next(iter(_eval_loader(cifar_store, "val", 48, channels_last=True)))[0]
    assert nhwc.shape == base.shape and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nhwc, base)
    half = next(iter(_eval_loader(cifar_store, "val", 48, dtype="float16")))[0]
    assert half.dtype == torch.float16 and (half.float() - base).abs().max() < 1e-3
    bf16 = next(iter(_eval_loader(cifar_store, "val", 48, dtype="bfloat16")))[0]
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - base).abs().max() < 1e-2


def test_eval_loader_counts_every_sample_once_with_uneven_shards(cifar_store):
    data = cifar_store.split("val")  # 200 samples over 3 ranks, batch 32: 67/67/66
    total = []
    for rank in range(3):
        loader = DaliLoader(labels=np.arange(len(data)), images=data.images, train=False,
                            spec=LoaderSpec(Preprocessing(32, MEAN, STD), num_threads=2),
                            shard=Shard(batch_size=32, rank=rank, world_size=3))
        total += [int(i) for _, y in loader for i in y]
    assert total == list(range(200))


def test_bfloat16_is_emitted_as_float16_then_cast_and_nothing_else_is_cast():
    from dali_pipelines.loader import dali_output_dtype

    assert dali_output_dtype("bfloat16") == ("float16", torch.bfloat16)
    assert dali_output_dtype("float16") == ("float16", None)
    assert dali_output_dtype("float32") == ("float32", None)
