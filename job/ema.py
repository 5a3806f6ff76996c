"""Weight EMA (``train.ema_epochs``): an exponential moving average of the weights that train,
timm's ``ModelEmaV3`` (batch-norm statistics included, with its warm-up), updated once per
optimizer update (not per micro-batch) on every rank alike, saved and resumed with the checkpoint.
Validation scores it beside the raw weights; ``best/`` keeps whichever validation picks."""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3


class WeightEma:
    """The averaged copy of ``module`` (the mode's trainable module: the whole network, or the
    head on cached features). ``horizon_epochs`` is the averaging horizon: the per-update decay is
    ``1 - 1 / (horizon_epochs x updates_per_epoch)``, reached after timm's warm-up (early updates
    weigh more, so the average does not start as the random head)."""

    def __init__(self, module: torch.nn.Module, horizon_epochs: float, updates_per_epoch: int):
        self.decay = 1.0 - 1.0 / max(horizon_epochs * updates_per_epoch, 1.0)
        self.average = ModelEmaV3(module, decay=self.decay, use_warmup=True)
        self.average.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.average.module

    def update(self, module: torch.nn.Module, step: int) -> None:
        """After optimizer update ``step`` (1-based): the same decay on every rank, and on resume."""
        self.average.update(module, step=step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
