"""What an optional feature of a run is: a component, built from its own config section, with only
the hooks it needs. The trainer (job/train.py) builds them in one list, calls every component's
hook at each event and registers each one's state with the checkpointer; it never knows which
features are present (docs/ARCHITECTURE.md: "Adding a feature"). The shapes are Lightning's
callbacks and Composer's algorithms acting on named events, kept to what this job needs.
"""
from __future__ import annotations

from typing import Callable

import torch

from job.early_stopping import metric_value

# Evaluates a module on the validation split (or the test split): {"loss", "accuracy", ...}.
Evaluate = Callable[[torch.nn.Module], dict]


class Component:
    """Every hook is a no-op here; a component overrides those it needs. ``name`` names its
    section, its checkpoint file (``tensor_state``: ``{name}.safetensors``) and its candidate
    weights in ``best/model.json``."""

    name = ""
    tensor_state = False  # True: state_dict() is tensors, saved as {name}.safetensors in each checkpoint

    def train_loader(self, epoch: int, loader):
        """The loader training epoch ``epoch`` reads: ``loader`` (the run's, or the previous
        component's), or one made instead (progressive resizing's, at the epoch's image size)."""
        return loader

    def on_epoch_start(self, epoch: int, batches: int, done: int) -> None:
        """Before training epoch ``epoch`` (0-based), ``done`` of its ``batches`` already trained (a resume)."""

    def on_batch(self) -> None:
        """After each micro-batch's backward pass."""

    def on_update(self, step: int) -> None:
        """After optimizer update ``step`` (1-based, counted over the run)."""

    def on_log(self, log) -> None:
        """Every ``train.log_every`` updates: a ``job.loop.StepLog``."""

    def on_epoch_end(self) -> None:
        """After the epoch's training, before its validation."""

    def on_freeze_change(self, frozen: bool) -> None:
        """The backbone was frozen or unfrozen (two_stage's second stage)."""

    def checkpoint_due(self) -> bool:
        """Asked every ``train.signal_check_every`` updates: True asks for a mid-epoch checkpoint."""
        return False

    def on_checkpoint(self, path, timed: bool = False) -> None:
        """A checkpoint was saved to ``path`` (``timed``: the mid-epoch one ``checkpoint_due`` asked for)."""

    def validate(self, evaluate: Evaluate) -> dict | None:
        """Another set of weights' validation, a candidate for ``best/`` beside the raw weights'."""
        return None

    def best_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole model's weights for ``best/`` when this component's candidate won."""
        return weights

    def after_test(self, test: dict, evaluate: Evaluate, model: torch.nn.Module) -> None:
        """After the test with the best weights: add entries to ``test`` (e.g. ``accuracy_tta``)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pick_best(candidates: dict[str, dict], metric: str) -> str:
    """The candidate whose validation scores best on the early-stopping metric; the first one
    (the raw weights) on a tie."""
    sign = -1 if metric.endswith("loss") else 1

    def score(name: str) -> float:
        return sign * metric_value(metric, candidates[name]["accuracy"], candidates[name]["loss"])

    names = list(candidates)
    best = names[0]
    for name in names[1:]:
        if score(name) > score(best):
            best = name
    return best
