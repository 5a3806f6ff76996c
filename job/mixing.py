"""Mixup / CutMix of training batches (the ``mix:`` section): timm's
``Mixup`` in batch mode, applied on the device after the loader, made safe for odd batch sizes
and reproducible across preemption.

timm draws lambda, the mixup-or-cutmix switch and the CutMix box from the global ``np.random``.
Here every call runs under a numpy state seeded from (``train.seed``, epoch, global step, rank,
micro-batch within the update) and the global state is put back afterwards: a run resumed from a
mid-epoch checkpoint mixes exactly as an uninterrupted one, and nothing else's draws move.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from job.components import Component
from job.config import Config, ConfigError, cutmix_on_features_message


def mixing_enabled(cfg: Config) -> bool:
    return cfg.mix.mixup_alpha > 0 or cfg.mix.cutmix_alpha > 0


class BatchMixer(Component):
    """``mix:``. Mixes a batch and returns soft targets (``num_classes`` columns, label smoothing
    applied); ``loss_fn`` is the loss that reads them, ``active(epoch)`` whether an epoch mixes at
    all. It acts inside the step (job/loop.py: ``TrainParts.mix``); its state is the seed alone."""

    name = "mix"
    loss_fn = SoftTargetCrossEntropy()

    def __init__(self, cfg: Config, num_classes: int, *, rank: int = 0, cached_features: bool = False):
        mc = cfg.mix
        if cached_features and mc.cutmix_alpha > 0:  # also refused by job/config.py: validate
            raise ConfigError(cutmix_on_features_message(mc.cutmix_alpha))
        self.seed, self.rank, self.off_epoch = cfg.train.seed, rank, mc.off_epoch
        self.num_classes, self.smoothing = num_classes, cfg.loss.label_smoothing
        self.mixup = Mixup(mixup_alpha=mc.mixup_alpha, cutmix_alpha=mc.cutmix_alpha, prob=mc.prob, mode="batch",
                           label_smoothing=self.smoothing, num_classes=num_classes)

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int, *, rank: int = 0,
                    cached_features: bool = False) -> "BatchMixer | None":
        """None when both alphas are 0 (mixing off)."""
        return cls(cfg, num_classes, rank=rank, cached_features=cached_features) if mixing_enabled(cfg) else None

    def active(self, epoch: int) -> bool:
        """``mix.off_epoch`` (0-based, 0 = never): from that epoch on, no mixing (timm's mixup_off_epoch)."""
        return self.off_epoch == 0 or epoch < self.off_epoch

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, *, epoch: int, step: int,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed ``x``, soft targets). ``x`` may be changed in place. timm pairs each sample with
        the batch reversed and asserts an even size: an odd batch (an epoch's tail) mixes its even
        prefix and keeps its last sample whole, with its smoothed one-hot target."""
        n = x.shape[0]
        even = n - n % 2
        with _numpy_draws(self.seed, epoch, step, self.rank, micro):
            if even == n:
                return self.mixup(x, labels)
            if even == 0:
                return x, mixup_target(labels, self.num_classes, 1.0, self.smoothing)
            head, head_targets = self.mixup(x[:even], labels[:even])
        tail_targets = mixup_target(labels[even:], self.num_classes, 1.0, self.smoothing)
        return torch.cat([head, x[even:]]), torch.cat([head_targets, tail_targets.to(head_targets.dtype)])


@contextlib.contextmanager
def _numpy_draws(*numbers: int) -> Iterator[None]:
    """The global numpy RNG seeded from ``numbers`` (non-negative ints) for the block, then restored."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence([int(v) for v in numbers]).generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)
