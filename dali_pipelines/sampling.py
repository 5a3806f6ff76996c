"""Which sample each rank reads at each step, and how it is augmented: pure NumPy, no DALI.

Everything the pipelines consume is a function of ``(seed, epoch, N, world_size, batch_size)``,
so any rank can compute its own share with no communication, a run on 1 or on 8 processes
augments a given sample identically, and a loader restarted at ``(epoch, step)`` yields exactly
what an uninterrupted one would have yielded from there.

Training shard rule (docs/SCALING.md, property-tested in tests/test_sampling.py):
  1. Shuffle all N indices with a generator seeded by ``(seed, epoch)``: every rank computes
     the same permutation.
  2. Cut positions ``[start, N)`` of it into global batches of ``G = world_size * batch_size``
     (``start`` is 0 except when resuming mid-epoch). Each global batch is split over the
     ranks as evenly as possible (``np.array_split``): a full one gives rank r the slice
     ``[r*b, (r+1)*b)``.
  3. The tail (``R`` samples, ``1 <= R <= G``) is split the same way. If ``R < 2 * world_size``
     some rank would get a batch of 0 or 1 sample (DDP cannot step on an empty batch, and a
     batch-norm layer cannot train on one sample), so the tail is folded into the previous
     global batch and those ``G + R`` samples are split instead (each rank gets ``b`` to ``b + 2``).
  So every rank runs the same number of steps, the shards are disjoint, and together they
  cover every training sample exactly once per epoch. Each step consumes a contiguous range
  of the permutation, so a position in the epoch is a number of *samples*, the same whatever
  the world size: a checkpoint written by 2 processes mid-epoch resumes on 1 (or 8) at the
  first unseen sample (``start``).

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


def global_steps(num_samples: int, world_size: int, batch_size: int, start: int = 0) -> list[tuple[int, int]]:
    """``[lo, hi)`` positions of the epoch permutation that each step consumes, all ranks together,
    from position ``start`` on (module docstring, rule 2-3)."""
    global_batch = world_size * batch_size
    bounds = list(range(start, num_samples, global_batch)) + [num_samples]
    if len(bounds) > 2 and num_samples - bounds[-2] < 2 * world_size:  # fold a tail too small to split
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def train_batches(num_samples: int, world_size: int, rank: int, batch_size: int,
                  start: int = 0) -> list[np.ndarray]:
    """Positions in the epoch permutation that ``rank`` reads, one array per step (module docstring)."""
    _check_shard_args(num_samples, world_size, rank, batch_size)
    if num_samples < world_size:
        raise ValueError(
            f"{num_samples} training samples cannot be sharded over {world_size} processes: "
            "every process needs at least one sample; use fewer processes or more data")
    if not 0 <= start <= num_samples:
        raise ValueError(f"start {start} outside [0, {num_samples}]")
    return [np.array_split(np.arange(lo, hi), world_size)[rank]
            for lo, hi in global_steps(num_samples, world_size, batch_size, start)]


@dataclass(frozen=True)
class Shard:
    """Which part of every split a process reads, and the seed of its shuffles: what every
    loader of a run shares."""

    batch_size: int  # per process
    rank: int = 0
    world_size: int = 1
    seed: int = 0


class EpochPlan:
    """One rank's batches of one split for an epoch, and where each step leaves the epoch (in
    samples, the same on every rank): what every loader iterates and reports."""

    def __init__(self, num_samples: int, *, train: bool, shard: Shard, batches: list[np.ndarray] | None = None):
        self.num_samples, self.train, self.batch_size = num_samples, train, shard.batch_size
        self.rank, self.world_size = shard.rank, shard.world_size
        self._explicit = batches
        self.full = batches if batches is not None else self._batches(0)
        self.start = 0
        self.batches, self.ends = self.full, self._ends(0)

    def _batches(self, start: int) -> list[np.ndarray]:
        if self.train:
            return train_batches(self.num_samples, self.world_size, self.rank, self.batch_size, start)
        return eval_batches(self.num_samples, self.world_size, self.rank, self.batch_size)

    def _ends(self, start: int) -> list[int]:
        if not self.train or self._explicit is not None:
            return []
        return [hi for _, hi in global_steps(self.num_samples, self.world_size, self.batch_size, start)]

    def restart(self, start: int = 0) -> None:
        """Plan the epoch from sample position ``start`` (0, or where a checkpoint left it)."""
        if start and not self.train:
            raise ValueError("only training plans resume mid-epoch")
        self.start = start
        self.batches = self.full if start == 0 else self._batches(start)
        self.ends = self._ends(start)

    def position_after(self, steps: int) -> int:
        """Samples of the epoch consumed (all ranks) once ``steps`` batches of this plan have run."""
        return self.ends[steps - 1] if steps else self.start

    @property
    def max_batch(self) -> int:
        """The largest batch any plan of this split may hold (a folded tail adds up to 2)."""
        return max([self.batch_size + 2 * self.train, *(len(b) for b in self.full)])


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


def auto_augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The DALI pipeline seed of one rank's epoch when auto-augmenting (data.auto_augment): the
    policy's random ops draw from it, so its draws are a function of (seed, epoch, rank)."""
    return int(np.random.default_rng([seed, epoch, 2, rank]).integers(0, 2**31 - 1))


class PlannedLoader:
    """What every loader shares (DaliLoader, TorchLoader, FeatureLoader): the epoch's ``plan``,
    ``len()`` (this rank's batches in a full epoch), ``set_epoch(epoch, start_sample)`` and the
    epoch's shuffle and augmentation draws."""

    def __init__(self, num_samples: int, *, train: bool, shard: Shard, augment: bool = False,
                 batches: list[np.ndarray] | None = None):
        self.num_samples, self.train, self.augment = num_samples, train, train and augment
        self.batch_size, self.seed = shard.batch_size, shard.seed
        self.plan = EpochPlan(num_samples, train=train, shard=shard, batches=batches)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.plan.full)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Prepare epoch ``epoch`` from sample position ``start_sample`` (resume mid-epoch)."""
        self.epoch = epoch
        self.plan.restart(start_sample)

    def epoch_draws(self) -> tuple[np.ndarray | None, Augmentation | None]:
        """This epoch's permutation (training) and augmentation parameters (when augmenting)."""
        order = epoch_permutation(self.num_samples, self.seed, self.epoch) if self.train else None
        aug = epoch_augmentation(self.num_samples, self.seed, self.epoch) if self.augment else None
        return order, aug


def _check_shard_args(num_samples: int, world_size: int, rank: int, batch_size: int) -> None:
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
