"""data.auto_augment: DALI's RandAugment / TrivialAugment Wide / AutoAugment on training loaders
(CPU pipeline; the GPU graph is the same function with ``device="gpu"``)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from dali_pipelines import pipelines, sampling
from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import AutoAugment, LoaderSpec, Preprocessing
from dali_pipelines.torch_loader import TorchLoader
from job.config import ConfigError, load_config

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
POLICIES = ["rand_augment", "trivial_augment", "auto_augment"]


def _loader(store, split="train", *, policy=None, train=True, seed=3, size=32, augment=True, batch=32):
    data = store.split(split)
    spec = LoaderSpec(Preprocessing(size, MEAN, STD), num_threads=2, augment=augment,
                      auto_augment=AutoAugment.of(policy) if policy else None)
    return DaliLoader(labels=data.labels, images=data.images, files=data.files, train=train, spec=spec,
                      shard=Shard(batch_size=batch, seed=seed))


def _first(loader, epoch=0, batches=1):
    loader.set_epoch(epoch)
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if i + 1 == batches:
            break
    return torch.cat([x for x, _ in out]), torch.cat([y for _, y in out])


def _fixed(store, policy=None, *, seed=3, n=2, m=9):
    """A training loader over one explicit batch without shift/flip: only auto-augment varies."""
    data = store.split("train")
    spec = LoaderSpec(Preprocessing(32, MEAN, STD), num_threads=2, augment=False,
                      auto_augment=AutoAugment.of(policy, n, m) if policy else None)
    return DaliLoader(labels=data.labels, images=data.images, train=True, spec=spec,
                      shard=Shard(batch_size=32, seed=seed), batches=[np.arange(32)])


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_changes_images_in_range_repeats_per_seed_and_epoch(cifar_store, policy):
    plain = _first(_fixed(cifar_store))[0]
    loader = _fixed(cifar_store, policy)
    x0 = _first(loader, epoch=0)[0]
    assert torch.isfinite(x0).all()
    lo, hi = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5  # [0, 255] pixels, normalized
    assert x0.min() >= lo - 1e-6 and x0.max() <= hi + 1e-6
    changed = (x0 - plain).abs().flatten(1).amax(1) > 1e-6
    assert changed.float().mean() > 0.3, changed  # most samples are touched (identity ops, p < 1 leave some)
    assert torch.equal(_first(_fixed(cifar_store, policy), epoch=0)[0], x0)  # same (seed, epoch): same pixels
    assert not torch.equal(_first(loader, epoch=1)[0], x0)  # same samples, next epoch: other draws


def test_composes_with_the_planned_shift_and_flip(cifar_store):
    """Same samples, same order as without auto-augment; the shift/flip plan is untouched."""
    plain, plain_y = _first(_loader(cifar_store), epoch=1)
    x, y = _first(_loader(cifar_store, policy="rand_augment"), epoch=1)
    assert torch.equal(y, plain_y) and not torch.equal(x, plain)


def test_evaluation_loaders_are_unaffected(cifar_store):
    ref, ref_y = _first(_loader(cifar_store, "test", train=False), batches=2)
    for policy in POLICIES:
        x, y = _first(_loader(cifar_store, "test", policy=policy, train=False), batches=2)
        assert torch.equal(x, ref) and torch.equal(y, ref_y)


def test_folder_encoded_path(folder_store):
    plain, _ = _first(_loader(folder_store, size=64, batch=16))
    x, _ = _first(_loader(folder_store, size=64, batch=16, policy="rand_augment"))
    assert x.shape == plain.shape == (16, 3, 64, 64)
    assert torch.isfinite(x).all() and x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    assert not torch.equal(x, plain)


def test_seed_is_a_function_of_seed_epoch_rank():
    seeds = {sampling.auto_augment_seed(s, e, r) for s in (0, 1) for e in (0, 1) for r in (0, 1)}
    assert len(seeds) == 8
    assert sampling.auto_augment_seed(5, 2, 1) == sampling.auto_augment_seed(5, 2, 1)


def test_cpu_and_gpu_graphs_are_one_function_with_only_device_changing():
    src = inspect.getsource(pipelines.image_pipeline)
    assert "apply_auto_augment(images, auto_augment, hw, draws=outputs[-1])" in src
    helper = inspect.getsource(pipelines.apply_auto_augment)
    assert "device ==" not in helper and '"gpu"' not in helper  # nothing backend specific


def _torch_loader(store, *, policy, n=64, batch=32, size=32, train=True, augment=True, batches=None):
    data = store.split("train")
    spec = LoaderSpec(Preprocessing(size, MEAN, STD), num_threads=2, augment=augment, backend="torch",
                      auto_augment=AutoAugment.of(policy) if policy else None)
    return TorchLoader(labels=data.labels[:n], images=None if data.images is None else data.images[:n],
                       files=None if data.files is None else data.files[:n], train=train, spec=spec,
                       shard=Shard(batch_size=batch, seed=5), batches=batches)


def _all(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return torch.cat([x.clone() for x, _ in loader])


@pytest.mark.parametrize("policy", POLICIES)
def test_torch_loader_policies_seeded_per_sample_and_exact_on_resume(cifar_store, policy):
    plain = _all(_torch_loader(cifar_store, policy=None, n=32, batch=16))
    loader = _torch_loader(cifar_store, policy=policy, n=32, batch=16)
    x0 = _all(loader)
    assert torch.isfinite(x0).all() and x0.min() >= -1 - 1e-6 and x0.max() <= 1 + 1e-6
    assert ((x0 - plain).abs().flatten(1).amax(1) > 1e-6).float().mean() > 0.3
    assert torch.equal(_all(_torch_loader(cifar_store, policy=policy, n=32, batch=16)), x0)
    assert torch.equal(_all(loader, start=16), x0[16:])  # draws keyed by position: resume is exact
    fixed = _torch_loader(cifar_store, policy=policy, augment=False, batches=[np.arange(16)])
    assert not torch.equal(_all(fixed, 0), _all(fixed, 1))  # same samples, other epoch: other draws


def test_torch_loader_encoded_path_and_evaluation(folder_store, cifar_store):
    plain = _all(_torch_loader(folder_store, policy=None, n=16, batch=16, size=48))
    x = _all(_torch_loader(folder_store, policy="rand_augment", n=16, batch=16, size=48))
    assert x.shape == plain.shape == (16, 3, 48, 48) and not torch.equal(x, plain)
    assert torch.equal(_all(_torch_loader(folder_store, policy="rand_augment", n=16, batch=16, size=48)), x)
    evaluation = _all(_torch_loader(cifar_store, policy="trivial_augment", train=False))
    assert torch.equal(evaluation, _all(_torch_loader(cifar_store, policy=None, train=False)))


@pytest.mark.parametrize("override, fragment", [
    ("data.auto_augment=randaugment", "data.auto_augment"),
    ("data.rand_augment_n=0", "data.rand_augment_n"),
    ("data.rand_augment_m=31", "data.rand_augment_m"),
    ("data.rand_augment_m=-1", "data.rand_augment_m"),
])
def test_config_refusals(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_config_accepts_policies():
    cfg = load_config(None, ["data.auto_augment=rand_augment", "data.rand_augment_n=3", "data.rand_augment_m=30"])
    assert (cfg.data.auto_augment, cfg.data.rand_augment_n, cfg.data.rand_augment_m) == ("rand_augment", 3, 30)
    assert AutoAugment.of(cfg.data.auto_augment, cfg.data.rand_augment_n, cfg.data.rand_augment_m) == \
        AutoAugment("rand_augment", 3, 30)
    assert AutoAugment.of("none") is None


def test_feature_cache_key_ignores_auto_augment():
    """Feature extraction runs evaluation loaders (never auto-augmented): the cache is shared."""
    from types import SimpleNamespace

    from job.features import feature_key

    def digest(*overrides):
        cfg = load_config(None, ["model.name=test_resnet", "model.pretrained=false", *overrides])
        return feature_key(cfg, Preprocessing(32, MEAN, STD), SimpleNamespace(fingerprint="abc")).digest()

    assert digest() == digest("data.auto_augment=rand_augment", "data.rand_augment_m=20")
