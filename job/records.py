"""The two records a run writes and its readers (tracking, plots, tests) read back through
job/run_dir.py: one line of ``history.jsonl`` per epoch, and ``metrics.json`` at the end.

Epochs are 0-based in every file and in code; ``shown_epoch`` is the one place that turns them
into the 1-based numbers people read (console lines, plots, W&B's epoch axis).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


def shown_epoch(epoch: int) -> int:
    return epoch + 1


@dataclass
class EpochRecord:
    epoch: int  # 0-based
    step: int  # optimizer updates so far
    lr: float  # the head's learning rate at the end of the epoch
    train_loss: float  # with label smoothing, as optimized
    train_accuracy: float
    train_samples: int
    epoch_seconds: float
    images_per_second: float  # global, all ranks
    images_per_second_per_device: float
    data_wait_fraction: float
    val_loss: float
    val_accuracy: float
    val_samples: int
    # images/s after the first log window (start-up, autotuning, compilation), device-synchronised;
    # 0 when the epoch was shorter than that window
    steady_images_per_second: float = 0.0
    val_accuracy_ema: float | None = None  # the weight EMA's (ema.epochs), None without one

    # Set by the trainer from where training is; the val_* fields come from the validation pass.
    _NOT_FROM_TRAINING = ("epoch", "step", "lr")

    @classmethod
    def train_fields(cls) -> tuple[str, ...]:
        """The fields the epoch's training sums give (job/loop.py: EpochSums.metrics)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in cls._NOT_FROM_TRAINING and not f.name.startswith("val_"))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "EpochRecord":
        record = cls(**json.loads(line))
        for f in dataclasses.fields(record):  # every field is a number; comparisons and sums follow
            value = getattr(record, f.name)
            if value is None and f.default is None:  # an optional figure, absent
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name}={value!r:.40} is not a number")
        return record


@dataclass
class RunSummary:
    test_accuracy: float  # the best weights, end to end on the test images
    test_loss: float
    test_samples: int
    test_per_class_accuracy: dict[str, float]
    best_val_accuracy: float | None
    best_epoch: int  # 0-based
    epochs_completed: int
    stopped_early: bool
    world_size: int
    global_steps: int
    train_images_per_second: float
    train_images_per_second_per_device: float
    data_wait_fraction: float
    confusion_matrix: list[list[int]]
    classes: list[str]
    replicas_identical: bool | None = None  # every rank ended with bit-identical weights (multi-process)
    features_cached: bool = False
    feature_extraction_seconds: float | None = None  # the one backbone pass (0 when the cache was reused)
    test_accuracy_cached: float | None = None  # the head on cached test features; must match test_accuracy
    train_images_per_second_steady: float | None = None  # after each epoch's first log window (EpochRecord)
    test_accuracy_tta: float | None = None  # tta.test=flip: with test-time flips, beside test_accuracy
    # train.strategy=linear_probe (job/linear_probe.py): the chosen L2 strength, the grid's solve time, its
    # L-BFGS iterations, and whether every grid value converged within PROBE_MAX_ITER
    probe_l2: float | None = None
    probe_solve_seconds: float | None = None
    probe_iterations: int | None = None
    probe_converged: bool | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunSummary":
        return cls(**json.loads(text))
