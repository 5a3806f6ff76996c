"""data.loader=torch: the DALI loader's contract on PyTorch alone, checked batch by batch against
DaliLoader on the real CIFAR-10 samples (raw and JPEG), train and eval, both layouts and dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec, Preprocessing, resolve_backend
from dali_pipelines.torch_loader import TorchLoader

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _pair(store, split, *, train, size, n=96, batch=32, **spec_kw):
    data = store.split(split)
    kwargs = dict(labels=data.labels[:n], images=None if data.images is None else data.images[:n],
                  files=None if data.files is None else data.files[:n], train=train,
                  shard=Shard(batch_size=batch, seed=5))
    spec = LoaderSpec(Preprocessing(size, MEAN, STD), num_threads=2, **spec_kw)
    return DaliLoader(spec=spec, **kwargs), TorchLoader(spec=spec, **kwargs)


def _epoch(loader, epoch=1, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("layout,dtype", [("CHW", "float32"), ("HWC", "bfloat16"), ("CHW", "float16")])
def test_raw_batches_match_dali_within_interpolation_rounding(cifar_store, train, layout, dtype):
    dali, torch_ = _pair(cifar_store, "train", train=train, size=75, channels_last=layout == "HWC", dtype=dtype)
    assert len(dali) == len(torch_) == 3
    a, b = _epoch(dali), _epoch(torch_)
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and ya.dtype == yb.dtype == torch.int64
        assert xa.shape == xb.shape == (32, 3, 75, 75) and xa.dtype == xb.dtype == getattr(torch, dtype)
        assert xa.is_contiguous(memory_format=torch.channels_last) == xb.is_contiguous(
            memory_format=torch.channels_last) == (layout == "HWC")
        diff = (xa.float() - xb.float()).abs()
        rounding = 1e-2 if dtype != "float32" else 1e-4
        assert diff.max() <= 2 / 255 + rounding and diff.mean() < 0.25 / 255 + rounding / 4, (diff.max(), diff.mean())


def test_jpeg_batches_match_dali_within_decoder_and_resize_rounding(folder_store):
    for train in (False, True):
        dali, torch_ = _pair(folder_store, "test", train=train, size=64, n=64)
        for (xa, ya), (xb, yb) in zip(_epoch(dali), _epoch(torch_)):
            assert torch.equal(ya, yb) and xa.shape == xb.shape == (32, 3, 64, 64)
            diff = (xa - xb).abs()
            # two JPEG decoders and two antialiased resizes: a few grey levels on average
            assert diff.mean() < 4 / 255, diff.mean()


def test_resume_mid_epoch_and_shards_follow_the_same_plan(cifar_store):
    data = cifar_store.split("train")
    spec = LoaderSpec(Preprocessing(32, MEAN, STD), num_threads=1, backend="torch")
    seen = []
    for rank in range(2):
        loader = TorchLoader(labels=np.arange(len(data)), images=data.images, train=True, spec=spec,
                             shard=Shard(batch_size=64, seed=0, rank=rank, world_size=2))
        seen += [int(i) for _, y in _epoch(loader, 4) for i in y]
    assert sorted(seen) == list(range(len(data)))
    whole = TorchLoader(labels=data.labels, images=data.images, train=True, spec=spec, shard=Shard(batch_size=64,
                                                                                                   seed=3))
    full, tail = _epoch(whole, 1), _epoch(whole, 1, start=17 * 64)
    assert len(tail) == len(full) - 17
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[17:], tail))


def test_auto_uses_dali_where_it_imports_and_says_so_when_it_falls_back(monkeypatch):
    assert resolve_backend("auto") == "dali" and resolve_backend("torch") == "torch"
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    said = []
    assert resolve_backend("auto", say=said.append) == "torch"
    assert "DALI is not importable" in said[0] and "PyTorch loader" in said[0]


class _FakeEvent:
    """A CUDA event stand-in: complete once the fake GPU has advanced past it."""

    gpu_done = 0
    recorded = 0

    def record(self):
        _FakeEvent.recorded += 1
        self.n = _FakeEvent.recorded

    def query(self):
        return _FakeEvent.gpu_done >= self.n

    def synchronize(self):
        _FakeEvent.gpu_done = max(_FakeEvent.gpu_done, self.n)


def test_gpu_batches_are_held_until_the_work_queued_after_them_has_run(monkeypatch):
    """DALI's buffers (DLPack) must outlive the kernels that read them (the GPU runs behind the
    host): a batch is released only when its event completed, the oldest waited for past depth."""
    from dali_pipelines.loader import HeldOutputs

    class OnGpu:  # what hold() looks at: the batch's device
        device = torch.device("cuda")

    held = HeldOutputs(depth=2, new_event=_FakeEvent)
    batches = [(OnGpu(), i) for i in range(4)]
    held.hold(batches[0])
    held.hold(batches[1])
    assert [b[1] for _, b in held.held] == [0, 1]  # the GPU has not run either step yet
    _FakeEvent.gpu_done = 1  # the step of batch 0 completed
    held.hold(batches[2])
    assert [b[1] for _, b in held.held] == [1, 2]
    held.hold(batches[3])  # 3 held > depth 2: wait for the oldest (batch 1's step), then release it
    assert [b[1] for _, b in held.held] == [2, 3] and _FakeEvent.gpu_done == 2
    cpu = HeldOutputs(depth=2, new_event=_FakeEvent)
    cpu.hold((torch.zeros(1), torch.zeros(1)))
    assert not cpu.held  # CPU work is done when the next batch is asked for


def test_steady_state_batches_read_nothing_back_from_the_device(cifar_store):
    """Padding sizes and gather indices come from the host (where the shifts are drawn): a GPU
    batch never waits for the previous step. ``aten._local_scalar_dense`` is what every
    ``int(tensor)``/``.item()`` dispatches (on CPU tensors too, so CPU counts what a GPU would)."""
    from helpers.aten_ops import AtenOps

    data = cifar_store.split("train")
    spec = LoaderSpec(Preprocessing(48, MEAN, STD), num_threads=1, backend="torch", augment=True)
    loader = TorchLoader(labels=data.labels[:160], images=data.images[:160], train=True, spec=spec,
                         shard=Shard(batch_size=32, seed=2))
    loader.set_epoch(1, 0)
    batches = iter(loader)
    next(batches)  # the first batch: thread start-up
    for _ in range(3):
        with AtenOps() as ops:
            x, y = next(batches)
        assert ops.counts["_local_scalar_dense"] == 0, ops.counts
        assert ops.counts["index"] == 1  # the shift's one gather: the augmentation did run
        assert x.shape == (32, 3, 48, 48) and y.shape == (32,)


def test_host_shift_indices_equal_the_device_rounding():
    """The host computes what ``torch.round(shift * side)`` gave on the device, ties included."""
    from dali_pipelines.torch_loader import _shift_indices

    rng = np.random.default_rng(0)
    shift = np.concatenate([rng.uniform(-0.125, 0.125, (500, 2)), [[0.5 / 32, -1.5 / 32], [2.5 / 32, 0.0]]])
    shift = shift.astype(np.float32)
    for h, w in ((32, 32), (299, 75)):
        pad, rows, cols = _shift_indices(shift, h, w)
        t = torch.from_numpy(shift)
        dx = torch.round(t[:, 0].float() * w).long()
        dy = torch.round(t[:, 1].float() * h).long()
        assert pad == int(max(dx.abs().max(), dy.abs().max()))
        assert np.array_equal(cols - pad - np.arange(w), dx.numpy()[:, None].repeat(w, 1))
        assert np.array_equal(rows - pad - np.arange(h), dy.numpy()[:, None].repeat(h, 1))
