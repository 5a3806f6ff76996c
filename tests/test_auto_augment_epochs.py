"""DALI auto-augmentation without a pipeline per epoch (dali_pipelines/pipelines.py: _HostDraws):
the policy's random choices come from per-sample uniforms drawn on the host, keyed by (seed, epoch,
position), so one pipeline serves every epoch and a resume, even mid-epoch, replays the images."""
from __future__ import annotations

import pytest
import torch

from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import AutoAugment, LoaderSpec, Preprocessing

POLICIES = ["rand_augment", "trivial_augment", "auto_augment"]


def _loader(store, policy, n=96):
    data = store.split("train")
    spec = LoaderSpec(Preprocessing(32, (0.5,) * 3, (0.5,) * 3), num_threads=2, augment=True,
                      auto_augment=AutoAugment.of(policy))
    return DaliLoader(labels=data.labels[:n], images=data.images[:n], train=True, spec=spec,
                      shard=Shard(batch_size=32, seed=7))


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [x.clone() for x, _ in loader]


@pytest.mark.parametrize("policy", POLICIES)
def test_one_pipeline_for_every_epoch_and_exact_resume(cifar_store, policy):
    loader = _loader(cifar_store, policy)
    first = _epoch(loader, 0)
    pipeline = loader._iterator
    second = _epoch(loader, 1)
    assert loader._iterator is pipeline  # reset, not rebuilt
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # the next epoch draws anew
    fresh = _loader(cifar_store, policy)
    assert all(torch.equal(a, b) for a, b in zip(second, _epoch(fresh, 1)))  # epoch 1 alone: the same images
    resumed = _loader(cifar_store, policy)
    tail = _epoch(resumed, 1, start=32)  # resumed after its first batch
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(second[1:], tail))


def test_the_policy_draws_from_the_host_numbers_not_a_random_operator():
    """Every random call the policies make is a values=range(N) choice or a [lo, hi) float: mapped
    from the host's uniforms, and the real operator is put back after the build."""
    import nvidia.dali.fn.random as random_ops

    from dali_pipelines.pipelines import _HostDraws, _random_from, auto_augment_draw_count

    real = random_ops.uniform
    with _random_from(object(), 8):
        assert isinstance(random_ops.uniform, _HostDraws)
    assert random_ops.uniform is real
    assert auto_augment_draw_count(AutoAugment.of("rand_augment", 2, 9)) == 8
    assert auto_augment_draw_count(AutoAugment.of("rand_augment", 6, 9)) == 12
    draws = _HostDraws(draws=None, count=3)
    with pytest.raises(ValueError, match="not range"):
        draws(values=[1, 5])
    with pytest.raises(ValueError, match="more than 3 draws"):
        draws.used = 3
        draws(values=[0, 1])


def test_the_same_sample_gets_the_same_augmentation_on_any_number_of_processes(cifar_store):
    import numpy as np

    data = cifar_store.split("train")
    spec = LoaderSpec(Preprocessing(32, (0.5,) * 3, (0.5,) * 3), num_threads=2, augment=True,
                      auto_augment=AutoAugment.of("rand_augment"))

    def images_by_sample(world):
        seen = {}
        for rank in range(world):
            loader = DaliLoader(labels=np.arange(96), images=data.images[:96], train=True, spec=spec,
                                shard=Shard(batch_size=48 // world, seed=7, rank=rank, world_size=world))
            loader.set_epoch(2, 0)
            for x, y in loader:
                seen.update({int(i): img.clone() for i, img in zip(y, x)})
        return seen

    one, two = images_by_sample(1), images_by_sample(2)
    assert sorted(one) == sorted(two) == list(range(96))
    assert all(torch.equal(one[i], two[i]) for i in range(96))
