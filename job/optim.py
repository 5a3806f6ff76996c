"""Optimizer and LR schedule from timm's factories, with per-part parameter groups."""
from __future__ import annotations

import warnings

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler

from job.config import OptimConfig, ScheduleConfig
from job.model import TransferModel


def build_optimizer(model: TransferModel, cfg: OptimConfig, train_backbone: bool) -> torch.optim.Optimizer:
    """Head groups at ``lr``; backbone groups at ``lr * backbone_lr_scale`` (timm's ``lr_scale``,
    which its schedulers honour). No weight decay on biases and norm parameters.

    Build it before freezing anything: timm skips parameters that do not require gradients,
    and ``two_stage`` needs the backbone groups present from the start.
    """
    groups = param_groups_weight_decay(model.head, cfg.weight_decay)
    if train_backbone and cfg.layer_decay is not None:
        groups += layer_decay_groups(model.backbone, cfg)
    elif train_backbone:
        for group in param_groups_weight_decay(model.backbone, cfg.weight_decay):
            groups.append({**group, "lr_scale": cfg.backbone_lr_scale})
    groups = [g for g in groups if g["params"]]
    kwargs = {"momentum": cfg.momentum} if cfg.name == "sgd" else {}
    # timm's "sgd" is SGD with Nesterov momentum.
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def layer_decay_groups(backbone: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Layer-wise LR decay (``optim.layer_decay``): timm's depth groups of the backbone (its
    ``group_matcher``), one level below the new head, which is depth 0 at the full LR. The
    backbone's last group is at ``lr x decay``, its stem at ``lr x decay^depth``. ``lr_scale``
    reaches the optimizer through timm's schedulers, which this job uses."""
    groups = param_groups_layer_decay(backbone, cfg.weight_decay, layer_decay=cfg.layer_decay)
    return [{**group, "lr_scale": group["lr_scale"] * cfg.layer_decay} for group in groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, epochs: int,
                    updates_per_epoch: int, plateau_mode: str) -> Scheduler:
    """cosine and step are stepped per optimizer update (``step_update``); plateau per epoch
    with the validation metric (``step(epoch, metric)``)."""
    per_update = cfg.name != "plateau"
    # warmup_prefix: warm up first, then decay over the remaining epochs, so the peak LR is
    # reached at the end of warm-up and the schedule ends exactly at `epochs`.
    with warnings.catch_warnings():
        # timm deprecates its plateau scheduler because timm's own checkpoints drop the state of
        # the wrapped ReduceLROnPlateau; ours keep it (trainer_state.json "plateau"), and resuming
        # a plateau run is tested (tests/test_optim.py: scheduler_state). It stays: it is the recipe's LR decay.
        warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=max(epochs - cfg.warmup_epochs, 1e-9) if per_update else epochs,
            warmup_prefix=per_update, decay_epochs=cfg.decay_epochs,
            decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs, patience_epochs=cfg.plateau_patience,
            plateau_mode=plateau_mode, step_on_epochs=not per_update,
            updates_per_epoch=updates_per_epoch if per_update else 0)
    return scheduler


def scheduler_state(scheduler: Scheduler) -> dict:
    """Everything a resumed run needs to continue the schedule, the plateau counters included
    (timm's plateau scheduler wraps torch's ReduceLROnPlateau, whose state its own does not hold)."""
    inner = getattr(scheduler, "lr_scheduler", None)
    return {"scheduler": scheduler.state_dict(), "plateau": inner.state_dict() if inner is not None else None}


def load_scheduler_state(scheduler: Scheduler, saved: dict) -> None:
    scheduler.load_state_dict(saved["scheduler"])
    inner = getattr(scheduler, "lr_scheduler", None)
    if inner is not None and saved.get("plateau") is not None:
        inner.load_state_dict(saved["plateau"])


class ScheduleState:
    """The schedule as a checkpointed part (``state_dict``/``load_state_dict``, JSON)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return scheduler_state(self.scheduler)

    def load_state_dict(self, saved: dict) -> None:
        load_scheduler_state(self.scheduler, saved)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's learning rate (the first group's), the one the config's ``lr`` names."""
    return float(optimizer.param_groups[0]["lr"])
