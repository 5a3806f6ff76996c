"""Which sample each rank reads at each step, and how it is augmented: pure NumPy, no DALI.

Everything the pipelines consume is a function of ``(seed, epoch, N, world_size, batch_size)``,
so any rank can compute its own share with no communication, a run on 1 or on 8 processes
augments a given sample identically, and a loader restarted at ``(epoch, step)`` yields exactly
what an uninterrupted one would have yielded from there.

Training shard rule (documented in the README, property-tested in tests/test_sampling.py):
  1. Shuffle all N indices with a generator seeded by ``(seed, epoch)``: every rank computes
     the same permutation.
  2. Cut it into ``steps = ceil(N / G)`` global batches, ``G = world_size * batch_size``. Every
     global batch but the last is full: rank r takes its slice ``[r*b, (r+1)*b)``.
  3. The tail (``R = N - (steps-1)*G`` samples, ``1 <= R <= G``) is split as evenly as
     possible over the ranks (sizes differ by at most one). If ``R < world_size`` some rank
     would get an empty batch, which DDP cannot step on; then the tail is folded into the
     previous global batch and those ``G + R`` samples are split evenly instead (each rank
     gets ``b`` or ``b + 1``).
  So every rank runs the same number of steps, the shards are disjoint, and together they
  cover every training sample exactly once per epoch.

Evaluation rule: the N samples in order are split into ``world_size`` contiguous chunks
(``np.array_split``); each rank batches its chunk with a partial last batch. Ranks may run
different numbers of steps, which is fine because evaluation only communicates once, after
the loop, to sum its counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Random-crop-with-padding for CIFAR: translate by up to 4 of 32 pixels (1/8 of the side).
MAX_SHIFT_FRACTION = 4 / 32
SHIFT_STEPS = 4  # shifts are multiples of MAX_SHIFT_FRACTION / SHIFT_STEPS: whole pixels at 32x32


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global shuffle of epoch ``epoch``: identical on every rank."""
    return np.random.default_rng([seed, epoch, 0]).permutation(num_samples)


def train_batches(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[np.ndarray]:
    """Positions in the epoch permutation that ``rank`` reads, one array per step (module docstring)."""
    _check_shard_args(num_samples, world_size, rank, batch_size)
    if num_samples < world_size:
        raise ValueError(
            f"{num_samples} training samples cannot be sharded over {world_size} processes: "
            "every process needs at least one sample; use fewer processes or more data")
    global_batch = world_size * batch_size
    steps = -(-num_samples // global_batch)
    tail_start = (steps - 1) * global_batch
    if num_samples - tail_start < world_size:  # a rank would get an empty last batch
        steps -= 1
        tail_start -= global_batch
    positions = np.arange(num_samples)
    batches = [positions[s * global_batch + rank * batch_size: s * global_batch + (rank + 1) * batch_size]
               for s in range(steps - 1)]
    batches.append(np.array_split(positions[tail_start:], world_size)[rank])
    return batches


def eval_batches(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[np.ndarray]:
    """Sample indices ``rank`` evaluates, in order, one array per step; may be empty."""
    _check_shard_args(num_samples, world_size, rank, batch_size)
    chunk = np.array_split(np.arange(num_samples), world_size)[rank]
    return [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]


@dataclass(frozen=True)
class Augmentation:
    """Per-sample augmentation parameters, indexed like the epoch permutation."""

    shift: np.ndarray  # (N, 2) float32: (x, y) translation as a fraction of the image side
    flip: np.ndarray  # (N,) int32: 1 = mirror horizontally


def epoch_augmentation(num_samples: int, seed: int, epoch: int) -> Augmentation:
    """Random translation (zero padded) and horizontal flip for every sample of an epoch."""
    rng = np.random.default_rng([seed, epoch, 1])
    steps = rng.integers(-SHIFT_STEPS, SHIFT_STEPS + 1, size=(num_samples, 2))
    shift = (steps * (MAX_SHIFT_FRACTION / SHIFT_STEPS)).astype(np.float32)
    flip = rng.integers(0, 2, size=num_samples, dtype=np.int32)
    return Augmentation(shift=shift, flip=flip)


def _check_shard_args(num_samples: int, world_size: int, rank: int, batch_size: int) -> None:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
