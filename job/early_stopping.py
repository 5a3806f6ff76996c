"""Early stopping on a validation metric: a small state machine with a checkpointable state."""
from __future__ import annotations

import math


def metric_value(metric: str, accuracy: float, loss: float) -> float:
    """The number ``early_stopping.metric`` names among a validation's accuracy and loss: the one
    place that maps the metric's name to a value (epochs, EMA candidates, the probe's grid)."""
    return accuracy if metric == "val_accuracy" else loss


class EarlyStopping:
    """Stop after ``patience`` epochs in which ``metric`` did not improve by more than ``min_delta``.

    ``patience=0`` never stops. ``update`` returns True when the epoch is the new best.
    """

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.mode = "min" if metric.endswith("loss") else "max"
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
