"""Shard and shuffle arithmetic (dali_pipelines/sampling.py): properties for any size."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dali_pipelines import sampling

sizes = st.integers(min_value=1, max_value=3000)
worlds = st.integers(min_value=1, max_value=8)
batches = st.integers(min_value=1, max_value=256)


@settings(max_examples=300, deadline=None)
@given(n=sizes, world=worlds, batch=batches, seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_train_shards_are_disjoint_complete_and_step_aligned(n, world, batch, seed, epoch):
    if n < world:
        with pytest.raises(ValueError, match="at least one sample"):
            sampling.train_batches(n, world, 0, batch)
        return
    order = sampling.epoch_permutation(n, seed, epoch)
    shards = [sampling.train_batches(n, world, r, batch) for r in range(world)]
    steps = {len(s) for s in shards}
    assert len(steps) == 1, "every rank must run the same number of steps (DDP would hang)"
    full_steps = -(-n // (world * batch))
    tail = n - (full_steps - 1) * world * batch
    folded = tail < 2 * world and full_steps > 1
    assert steps.pop() == (full_steps - 1 if folded else full_steps)
    flat = np.concatenate([order[b] for s in shards for b in s])
    assert len(flat) == n and np.array_equal(np.sort(flat), np.arange(n)), "disjoint and complete"
    for s in shards:
        assert all(1 <= len(b) <= batch + 2 for b in s), "no empty batch; at most two extra samples"
        assert all(len(b) == batch for b in s[:-1]), "all but the tail are full batches"
        if full_steps > 1:
            assert len(s[-1]) >= min(2, batch), "no one-sample batch (batch norm) once there is a tail to fold"


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 3000), seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_shuffle_is_deterministic_and_changes_between_epochs(n, seed, epoch):
    a = sampling.epoch_permutation(n, seed, epoch)
    assert np.array_equal(a, sampling.epoch_permutation(n, seed, epoch))
    if n >= 8:  # a permutation of 8+ items repeats with probability < 1/40000
        assert not np.array_equal(a, sampling.epoch_permutation(n, seed, epoch + 1))
        aug_a, aug_b = sampling.epoch_augmentation(n, seed, epoch), sampling.epoch_augmentation(n, seed, epoch + 1)
        assert not np.array_equal(aug_a.shift, aug_b.shift)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 3000), world=worlds, batch=batches)
def test_eval_shards_cover_every_sample_exactly_once_in_order(n, world, batch):
    shards = [sampling.eval_batches(n, world, r, batch) for r in range(world)]
    flat = np.concatenate([b for s in shards for b in s] or [np.zeros(0, int)])
    assert np.array_equal(flat, np.arange(n))
    assert all(1 <= len(b) <= batch for s in shards for b in s)


def test_tail_rule_on_a_worked_example():
    # 10 samples, 4 ranks, batch 2: global batch 8, tail of 2 < 4 ranks -> folded: 10 split 3/3/2/2.
    assert [[list(b) for b in sampling.train_batches(10, 4, r, 2)] for r in range(4)] == \
        [[[0, 1, 2]], [[3, 4, 5]], [[6, 7]], [[8, 9]]]
    # 13 samples, 2 ranks, batch 4: one full global batch then a tail of 5 split 3/2.
    assert [[list(b) for b in sampling.train_batches(13, 2, r, 4)] for r in range(2)] == \
        [[[0, 1, 2, 3], [8, 9, 10]], [[4, 5, 6, 7], [11, 12]]]


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 3000), world=worlds, batch=batches, new_world=worlds, data=st.data())
def test_a_mid_epoch_position_resumes_on_any_world_size_with_every_sample_seen_once(n, world, batch, new_world,
                                                                                     data):
    """A checkpoint records the samples consumed (all ranks); resuming on another world size plans
    the rest of the permutation: nothing seen twice, nothing skipped."""
    if n < max(world, new_world):
        return
    plans = [sampling.EpochPlan(n, train=True, shard=sampling.Shard(batch, r, world)) for r in range(world)]
    steps = data.draw(st.integers(0, len(plans[0].batches)))
    position = plans[0].position_after(steps)
    assert {p.position_after(steps) for p in plans} == {position}, "every rank agrees on the position"
    seen = np.concatenate([b for p in plans for b in p.batches[:steps]] or [np.zeros(0, int)])
    assert np.array_equal(np.sort(seen), np.arange(position)), "the consumed samples are a prefix"
    resumed = [sampling.EpochPlan(n, train=True, shard=sampling.Shard(batch, r, new_world))
               for r in range(new_world)]
    for p in resumed:
        p.restart(position)
    rest = np.concatenate([b for p in resumed for b in p.batches] or [np.zeros(0, int)])
    assert np.array_equal(np.sort(np.concatenate([seen, rest])), np.arange(n))
    assert len({len(p.batches) for p in resumed}) == 1
    if new_world == world:  # the same world size continues exactly the uninterrupted plan
        for p, q in zip(plans, resumed):
            assert [list(b) for b in p.batches[steps:]] == [list(b) for b in q.batches]


def test_a_tail_that_would_leave_one_sample_on_a_rank_is_folded():
    # 2 ranks, batch 4, 11 samples: tail 3 would be split 2/1 -> folded into the previous step: 6/5.
    assert [[len(b) for b in sampling.train_batches(11, 2, r, 4)] for r in range(2)] == [[6], [5]]
    # 1 rank, batch 4, 9 samples: a tail of 1 -> folded: 4, 5.
    assert [len(b) for b in sampling.train_batches(9, 1, 0, 4)] == [4, 5]


def test_augmentation_is_whole_pixel_shifts_within_padding():
    aug = sampling.epoch_augmentation(5000, seed=3, epoch=1)
    pixels = aug.shift * 32
    assert np.allclose(pixels, np.round(pixels)) and np.abs(pixels).max() == 4
    assert set(np.unique(aug.flip)) == {0, 1}
    assert 0.45 < aug.flip.mean() < 0.55
