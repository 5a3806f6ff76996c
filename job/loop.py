"""One training epoch and one evaluation pass, with exact cross-rank counts and no per-step host sync."""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from job.config import BadInput, TrainConfig
from job.optim import current_lr
from job.records import shown_epoch


@dataclass
class EpochSums:
    """Global sums over (part of) an epoch; an epoch interrupted by preemption carries its
    partial sums in the checkpoint, so its history line is exact on resume."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    seconds: float = 0.0  # the slowest rank's wall time
    wait_seconds: float = 0.0  # time spent waiting for batches, averaged over ranks
    # The steady state: from the end of the first log window (pipeline start-up, cuDNN autotuning,
    # compilation) to the end, timed with the device synchronised at both edges.
    steady_samples: float = 0.0
    steady_seconds: float = 0.0  # the slowest rank's

    def add(self, other: "EpochSums") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def metrics(self, world_size: int) -> dict:
        """The training part of the epoch's EpochRecord, spread into it with ``**``: its keys are
        exactly ``EpochRecord.train_fields()`` (tests/test_run_dir.py checks it)."""
        n, seconds = max(self.samples, 1), max(self.seconds, 1e-9)
        return {"train_loss": self.loss_sum / n, "train_accuracy": self.correct / n,
                "train_samples": int(self.samples), "epoch_seconds": self.seconds,
                "images_per_second": self.samples / seconds,
                "images_per_second_per_device": self.samples / seconds / world_size,
                "data_wait_fraction": self.wait_seconds / seconds,
                "steady_images_per_second": self.steady_samples / max(self.steady_seconds, 1e-9)}


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint (``trainer_state.json``)."""

    epoch: int = 0  # the epoch in progress (or next to run), 0-based
    # samples of `epoch` already consumed, all ranks together: a prefix of the epoch's permutation,
    # so a checkpoint resumes at the same sample on any world size (dali_pipelines/sampling.py)
    samples_in_epoch: int = 0
    global_step: int = 0  # optimizer updates so far
    partial: EpochSums = field(default_factory=EpochSums)
    run_id: str | None = None  # the W&B run this job writes to

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update({**state, "partial": EpochSums(**state["partial"])})


@dataclass
class StepLog:
    """What ``train_one_epoch`` reports every ``log_every`` updates."""

    step: int
    loss: float
    lr: float
    images_per_second: float
    data_wait_fraction: float


@dataclass
class TrainParts:
    """What a training step touches. ``model`` is what is called (possibly compiled), ``ddp`` the
    DistributedDataParallel module inside it, if any (its ``no_sync`` skips the gradient
    all-reduce; a compiled wrapper's would not)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm Scheduler: step_update(num_updates)
    accelerator: Accelerator
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ddp: torch.nn.Module | None = None
    # Mixup / CutMix (job/mixing.py: BatchMixer), None = off. In the epochs it is active it mixes
    # each batch, its soft-target loss replaces loss_fn and accuracy counts the dominant label.
    mix: object | None = None
    # (model, ddp) by "backbone frozen": two_stage's frozen stage may call a head-only wrapper
    # (job/modes.py: wrap); empty = one stage
    stages: dict = field(default_factory=dict)

    def use_stage(self, frozen: bool) -> None:
        self.model, self.ddp = self.stages[frozen]


class Pause(enum.Enum):
    """Why ``train_one_epoch`` stops at a step boundary (``StepHooks.poll``, collective)."""

    CHECKPOINT = "checkpoint"  # a timed checkpoint is due: save and go on
    PREEMPTED = "preempted"  # SIGTERM reached some rank: save and exit 143


@dataclass
class StepHooks:
    """What the trainer does at step boundaries. ``poll`` is collective, asked every
    ``signal_check_every`` updates: None, or a ``Pause`` for ``pause``,
    which gets the state with this epoch's sums folded in (it saves a checkpoint; on preemption
    it raises ``job.preemption.Preempted``, which ends the epoch)."""

    poll: Callable[[], Pause | None] = lambda: None
    pause: Callable[[Pause], None] = lambda event: None
    on_update: Callable[[int], None] = lambda step: None  # after optimizer update `step` (a weight EMA's)
    on_log: Callable[[StepLog], None] = lambda _: None
    on_batch: Callable[[], None] = lambda: None


def device_time(device: torch.device) -> float:
    """Now, once the device has finished the work queued so far: a GPU runs behind the host, so
    a host clock read without it would time the queueing, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ThroughputMeter:
    """Images per second and the fraction of time spent waiting for data, over a window whose
    edges are device-synchronised (once per log window, where the loss is read anyway)."""

    def __init__(self, world_size: int, device: torch.device = torch.device("cpu")):
        self.world_size, self.device = world_size, device
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.wait = device_time(self.device), 0, 0.0

    def add(self, images: int, waited: float) -> None:
        self.images += images
        self.wait += waited

    def read(self) -> tuple[float, float]:
        """(global images/s, data-wait fraction) since the last reset."""
        elapsed = max(device_time(self.device) - self.start, 1e-9)
        return self.images * self.world_size / elapsed, self.wait / elapsed


class RunningSums:
    """This rank's sums since the last fold: device-side loss and correct counts (adding to them
    never waits for the GPU), host-side sample count and times. ``fold`` reduces them over the
    ranks into the epoch's ``EpochSums`` (one all-reduce and one gather) and starts again."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steady: tuple[float, int] | None = None  # (time, samples) when the steady window opened
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss_sum, correct
        self.samples = 0
        self.wait_seconds = 0.0
        self.start = time.perf_counter()
        if self.steady is not None:  # after a pause the pipeline and kernels are still warm
            self.steady = (device_time(self.device), 0)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, waited: float) -> None:
        n = labels.shape[0]
        self.sums += torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == labels).sum().double()])
        self.samples += n
        self.wait_seconds += waited

    def open_steady_window(self) -> None:
        if self.steady is None:
            self.steady = (device_time(self.device), self.samples)

    def fold(self, acc: Accelerator, into: EpochSums) -> None:
        into.add(_reduce_sums(acc, self.sums, self.samples, time.perf_counter() - self.start, self.wait_seconds,
                              self.steady))
        self.reset()


def train_one_epoch(cfg: TrainConfig, parts: TrainParts, loader, state: TrainState,
                    hooks: StepHooks = StepHooks()) -> dict:
    """Train through the rest of ``state.epoch``; return the epoch's metrics (reduced over
    ranks). ``hooks.pause`` may save a checkpoint mid-epoch (``state`` then points at the next
    batch) and go on, or raise ``Preempted``, which propagates."""
    acc = parts.accelerator
    parts.model.train()
    running = RunningSums(acc.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=acc.device)  # the first update with a non-finite loss
    plan = loader.plan  # what this iteration yields: the rest of the epoch
    window, micro, consumed, remaining = ThroughputMeter(acc.num_processes, acc.device), 0, 0, len(plan.batches)
    batches = iter(loader)
    mixing = parts.mix is not None and parts.mix.active(state.epoch)
    loss_fn = parts.mix.loss_fn if mixing else parts.loss_fn
    while True:
        fetch_start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        waited = time.perf_counter() - fetch_start
        micro += 1
        update = micro % cfg.grad_accum_steps == 0 or micro == remaining
        targets = labels
        if mixing:  # drawn from (seed, epoch, update, rank, micro-batch): a resumed run mixes alike
            images, targets = parts.mix(images, labels, epoch=state.epoch, step=state.global_step, micro=micro)
            labels = targets.argmax(1)  # training accuracy counts the dominant label
        # Skip DDP's gradient all-reduce on micro-batches that do not end in an update.
        sync = contextlib.nullcontext() if update or parts.ddp is None else parts.ddp.no_sync()
        if cfg.compile:
            # One graph for every batch size: the epoch's tail (a folded or shorter batch) would
            # otherwise recompile, long after the collective timeout was shortened.
            torch._dynamo.maybe_mark_dynamic(images, 0)
        with sync:
            with acc.autocast():
                logits = parts.model(images)
                loss = loss_fn(logits.float(), targets)
            # the epoch's last window may hold fewer micro-batches: average over those it has
            acc.backward(loss / min(cfg.grad_accum_steps, remaining))
        running.add(loss, logits, labels, waited)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), state.global_step + 1, first_bad)
        window.add(labels.shape[0], waited)
        hooks.on_batch()
        if not update:
            continue
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(parts.model.parameters(), cfg.grad_clip)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        hooks.on_update(state.global_step)
        consumed += micro
        state.samples_in_epoch = plan.position_after(consumed)
        remaining -= micro
        micro = 0
        parts.scheduler.step_update(num_updates=state.global_step)
        if consumed >= cfg.log_every * cfg.grad_accum_steps:  # start-up, autotuning and compilation are behind
            running.open_steady_window()
        if state.global_step % cfg.log_every == 0:
            images_per_second, wait_fraction = window.read()
            hooks.on_log(StepLog(step=state.global_step, loss=loss.item(), lr=current_lr(parts.optimizer),
                                 images_per_second=images_per_second, data_wait_fraction=wait_fraction))
            window.reset()
        if state.global_step % cfg.signal_check_every == 0 and (event := hooks.poll()) is not None:
            running.fold(acc, state.partial)
            hooks.pause(event)
    running.fold(acc, state.partial)
    _stop_if_not_finite(state, first_bad)
    metrics = state.partial.metrics(acc.num_processes)
    state.partial = EpochSums()
    return metrics


class NonFiniteLossError(BadInput):
    """The training loss became NaN or infinite: the weights are garbage from there on (exit 2)."""


def _stop_if_not_finite(state: TrainState, first_bad: torch.Tensor) -> None:
    """Checked once per epoch on the reduced loss sum, so every rank decides alike (a NaN on one
    rank reaches all of them through the gradient all-reduce); the step is this rank's first."""
    if math.isfinite(state.partial.loss_sum):
        return
    step = int(first_bad.item())
    where = f"at step {step}" if step >= 0 else "on another process"
    raise NonFiniteLossError(f"the training loss became NaN or infinite {where} (epoch {shown_epoch(state.epoch)}): "
                             "the run is stopped; the last checkpoint and best/ are kept. Lower optim.lr, set "
                             "train.grad_clip, or check the data")


def _reduce_sums(acc: Accelerator, sums: torch.Tensor, samples: int, seconds: float,
                 wait_seconds: float, steady: tuple[float, int] | None) -> EpochSums:
    """This rank's sums -> global sums (one all-reduce and one gather per epoch or preemption)."""
    steady_seconds, steady_samples = 0.0, 0
    if steady is not None:
        steady_seconds = device_time(acc.device) - steady[0]
        steady_samples = samples - steady[1]
    counts = [float(samples), float(steady_samples)]
    local = torch.cat([sums, torch.tensor(counts, dtype=torch.float64, device=sums.device)])
    loss_sum, correct, total, steady_total = acc.reduce(local, reduction="sum").tolist()
    times = torch.tensor([[seconds, wait_seconds, steady_seconds]], dtype=torch.float64, device=sums.device)
    times = acc.gather(times).cpu()
    return EpochSums(loss_sum=loss_sum, correct=correct, samples=total, seconds=float(times[:, 0].max()),
                     wait_seconds=float(times[:, 1].mean()), steady_samples=steady_total,
                     steady_seconds=float(times[:, 2].max()))


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int, tta: str = "none") -> dict:
    """Accuracy, loss and per-class counts over the whole split; every sample counted once.

    Each rank evaluates its own contiguous chunk; one all-reduce of the confusion matrix and the
    loss sum at the end gives exact totals however the count divides. Pass the bare model, not
    the DDP wrapper: ranks may run different numbers of batches here. ``tta="flip"``: each
    image's class probabilities are the mean of its and its mirror image's softmax.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images).float()
            if tta == "flip":  # log of the mean probability: cross-entropy and argmax read it as logits
                mirrored = model(images.flip(-1)).float()
                logits = torch.logsumexp(torch.stack([logits.log_softmax(1), mirrored.log_softmax(1)]), 0)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        cells = labels * num_classes + logits.argmax(1)
        confusion.index_add_(0, cells, torch.ones_like(cells))  # unlike bincount, no host sync on GPU
    confusion = accelerator.reduce(confusion, reduction="sum").view(num_classes, num_classes).cpu()
    loss_sum = accelerator.reduce(loss_sum, reduction="sum").item()
    model.train(was_training)
    samples = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp(min=1)
    return {"accuracy": float(confusion.diag().sum()) / max(samples, 1), "loss": loss_sum / max(samples, 1),
            "samples": samples, "per_class_accuracy": (confusion.diag() / per_class_total).tolist(),
            "confusion": confusion.tolist()}
