"""One training epoch and one evaluation pass, with exact cross-rank counts and no per-step host sync."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from job.optim import current_lr


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint (Accelerate's custom-object protocol)."""

    epoch: int = 0  # the epoch in progress (or next to run)
    step_in_epoch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer updates so far
    # Partial sums of an epoch interrupted by preemption, so its history line is exact on resume.
    partial: dict = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "samples": 0.0,
                                                   "seconds": 0.0, "wait_seconds": 0.0})
    run_id: str | None = None  # the W&B run this job writes to

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class StepLog:
    """What ``train_one_epoch`` reports to its ``on_log`` callback every ``log_every`` updates."""

    step: int
    loss: float
    lr: float
    images_per_second: float
    data_wait_fraction: float


def train_one_epoch(model, loader, optimizer, scheduler, accelerator: Accelerator, state: TrainState, *,
                    label_smoothing: float, grad_clip: float, grad_accum_steps: int, log_every: int,
                    signal_check_every: int, preempt_requested: Callable[[], bool],
                    on_log: Callable[[StepLog], None] = lambda _: None,
                    progress=None) -> dict | None:
    """Train through the rest of ``state.epoch``. Returns the epoch's metrics (reduced over ranks),
    or None when preemption was requested: then ``state`` points at the next batch to run."""
    model.train()
    device = accelerator.device
    # Device-side running sums (loss_sum, correct) for this rank: adding to them never waits for
    # the GPU; the sample count is known on the host.
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    samples = 0
    window_images, window_start, window_wait = 0, time.perf_counter(), 0.0
    epoch_start, wait_seconds = time.perf_counter(), 0.0
    batches = iter(loader)
    micro = 0
    while True:
        fetch_start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        waited = time.perf_counter() - fetch_start
        wait_seconds += waited
        window_wait += waited
        micro += 1
        update = micro % grad_accum_steps == 0 or micro == len(loader) - state.step_in_epoch
        # Skip DDP's gradient all-reduce on micro-batches that do not end in an update.
        with accelerator.no_sync(model) if not update else contextlib.nullcontext():
            with accelerator.autocast():
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            accelerator.backward(loss / grad_accum_steps)
        n = labels.shape[0]
        sums += torch.stack([loss.detach().double() * n, (logits.detach().argmax(1) == labels).sum().double()])
        samples += n
        window_images += n
        if progress is not None:
            progress.update(1)
        if not update:
            continue
        if grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.step_in_epoch += micro
        micro = 0
        scheduler.step_update(num_updates=state.global_step)
        if state.global_step % log_every == 0:
            elapsed = time.perf_counter() - window_start
            log = StepLog(step=state.global_step, loss=loss.item(), lr=current_lr(optimizer),
                          images_per_second=window_images * accelerator.num_processes / max(elapsed, 1e-9),
                          data_wait_fraction=window_wait / max(elapsed, 1e-9))
            on_log(log)
            window_images, window_start, window_wait = 0, time.perf_counter(), 0.0
        if state.global_step % signal_check_every == 0 and preempt_requested():
            _accumulate_partial(state, accelerator, sums, samples, time.perf_counter() - epoch_start, wait_seconds)
            return None
    _accumulate_partial(state, accelerator, sums, samples, time.perf_counter() - epoch_start, wait_seconds)
    p = state.partial
    metrics = {"train_loss": p["loss_sum"] / max(p["samples"], 1), "train_accuracy": p["correct"] / max(p["samples"], 1),
               "train_samples": int(p["samples"]), "epoch_seconds": p["seconds"],
               "images_per_second": p["samples"] / max(p["seconds"], 1e-9),
               "images_per_second_per_device": p["samples"] / max(p["seconds"], 1e-9) / accelerator.num_processes,
               "data_wait_fraction": p["wait_seconds"] / max(p["seconds"], 1e-9)}
    state.partial = TrainState().partial
    return metrics


def _accumulate_partial(state: TrainState, accelerator: Accelerator, sums: torch.Tensor, samples: int,
                        seconds: float, wait_seconds: float) -> None:
    """Fold this rank's sums into the global partial sums (one all-reduce per epoch or preemption)."""
    local = torch.cat([sums, torch.tensor([float(samples)], dtype=torch.float64, device=sums.device)])
    total = accelerator.reduce(local, reduction="sum").tolist()
    times = accelerator.gather(torch.tensor([[seconds, wait_seconds]], dtype=torch.float64,
                                            device=sums.device)).cpu()
    p = state.partial
    p["loss_sum"] += total[0]
    p["correct"] += total[1]
    p["samples"] += total[2]
    p["seconds"] += float(times[:, 0].max())  # the slowest rank's wall time is the epoch's
    p["wait_seconds"] += float(times[:, 1].mean())


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, num_classes: int) -> dict:
    """Accuracy, loss and per-class counts over the whole split; every sample counted once.

    Each rank evaluates its own contiguous chunk; one all-reduce of the confusion matrix and the
    loss sum at the end gives exact totals however the count divides. Pass the bare model, not
    the DDP wrapper: ranks may run different numbers of batches here.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
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


@torch.no_grad()
def sample_predictions(model, store, spec, device, count: int = 16) -> list[dict]:
    """The first ``count`` test images with the model's prediction (for the W&B / PNG grid)."""
    import numpy as np
    from PIL import Image

    from dali_pipelines.loader import DaliLoader

    split = store.split("test")
    k = min(count, len(split))
    loader = DaliLoader(labels=split.labels[:k], images=None if split.images is None else split.images[:k],
                        files=None if split.files is None else split.files[:k], spec=spec, train=False, batch_size=k)
    was_training = model.training
    model.eval()
    preds = torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in loader]).tolist()
    model.train(was_training)
    pixels = (split.images[:k] if split.images is not None
              else [np.asarray(Image.open(f).convert("RGB")) for f in split.files[:k]])
    return [{"image": np.asarray(pixels[i]), "pred": store.classes[preds[i]], "true": store.classes[split.labels[i]]}
            for i in range(k)]
