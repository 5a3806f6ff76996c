"""How a run trains: images through the backbone every epoch, or a head on the frozen backbone's
features computed once. ``build_mode`` chooses from the config, once; ``Trainer`` asks the mode
for its loaders, the module that trains, the module that is evaluated, the freeze schedule, the
training wrappers and the test, and never branches on it (timm's ``TrainingTask``:
``get_trainable_module()`` / ``get_eval_model()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator

from dali_pipelines.loader import make_loader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec
from job.config import Config, TrainConfig
from job.distributed import head_only_step, wrap_for_training
from job.features import SPLITS, FeatureLoader, FeatureSet, cached_features, feature_key
from job.linear_probe import ProbeResult, solve_probe
from job.loop import evaluate
from job.model import Strategy, TransferModel
from job.storage import feature_cache_root
from job.trunk import TrunkMode


@dataclass
class RunInputs:
    """What a mode builds its loaders from."""

    accelerator: Accelerator
    cfg: Config
    store: object  # job.data.Store
    spec: LoaderSpec
    model: TransferModel
    shard: Shard
    stop_requested: Callable[[], bool]  # collective: SIGTERM on any rank


# What to call for a training step and its DDP module (None on one process), by "backbone frozen".
Stages = dict[bool, tuple[torch.nn.Module, torch.nn.Module | None]]


class ImageMode:
    """``finetune``, ``two_stage``, and ``feature_extraction`` with ``features.cache=false``:
    every batch goes through the backbone, augmented."""

    augments = True
    cached = False
    solves = False  # True: job/train.py's fit solves the head (job/linear_probe.py) instead of the epochs
    extraction_seconds: float | None = None

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def describe(self) -> str:
        return self.strategy.name

    def summary_fields(self) -> dict:
        """What this mode adds to metrics.json (job/records.py: RunSummary)."""
        return {}

    def loaders(self, inputs: RunInputs) -> dict:
        return {split: make_loader(inputs.store, split, inputs.spec, train=split == "train", shard=inputs.shard)
                for split in ("train", "val")}

    def trainable(self, model: TransferModel) -> torch.nn.Module:
        return model

    def evaluated(self, model: TransferModel) -> torch.nn.Module:
        return model

    def frozen_while_wrapping(self) -> bool:
        """DDP registers only what requires a gradient when it is built: a backbone that trains at
        any epoch (two_stage's, frozen in stage one) must be unfrozen then."""
        return not self.strategy.trains_backbone

    def wrap(self, acc: Accelerator, model: TransferModel, optimizer,
             cfg: TrainConfig) -> tuple[Stages, torch.optim.Optimizer]:
        """The DDP (and compiled) wrappers; two_stage on several processes runs its frozen stage
        through a head-only one (job/distributed.py: head_only_step)."""
        call, ddp, optimizer = wrap_for_training(acc, model, optimizer, compile=cfg.compile)
        stages = {False: (call, ddp), True: (call, ddp)}
        if ddp is not None and self.strategy.head_only_stage:
            stages[True] = head_only_step(acc, model, cfg)
        return stages, optimizer

    def test(self, acc: Accelerator, model: TransferModel, test_loader, num_classes: int) -> dict:
        """The test split, end to end through the backbone."""
        return evaluate(model, test_loader, acc, num_classes)


class FeatureMode:
    """``feature_extraction`` with the cache (the default): the frozen backbone's pooled features
    of every image are computed once (no augmentation: the fixed-feature protocol) and the head
    trains on them (job/features.py)."""

    augments = False
    cached = True
    solves = False

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.features: FeatureSet | None = None

    def summary_fields(self) -> dict:
        return {}

    @property
    def extraction_seconds(self) -> float | None:
        return self.features.extraction_seconds if self.features is not None else None

    def describe(self) -> str:
        return f"{self.strategy.name}, cached features"

    def loaders(self, inputs: RunInputs) -> dict:
        acc, cfg = inputs.accelerator, inputs.cfg
        inputs.model.freeze_backbone(True)
        acc.print("features.cache: the frozen backbone's features are computed once, so training-time "
                  "augmentation is off (the fixed-feature protocol)")
        key = feature_key(cfg, inputs.spec.prep, inputs.store, precision=acc.mixed_precision)
        self.features = cached_features(acc, inputs.model, inputs.store, inputs.spec, key, feature_cache_root(cfg),
                                        cfg.data.batch_size, inputs.stop_requested)
        verb = ("reusing cached features" if self.features.reused else
                f"extracted features in {self.features.extraction_seconds:.1f}s")
        acc.print(f"{verb} ({self.features.path})")
        loaders = {split: FeatureLoader(self.features.features[split], self.features.labels[split],
                                        train=split == "train", device=acc.device, shard=inputs.shard)
                   for split in SPLITS}
        self._test_features = loaders.pop("test")  # touched once, by test()
        return loaders

    def trainable(self, model: TransferModel) -> torch.nn.Module:
        return model.head

    def evaluated(self, model: TransferModel) -> torch.nn.Module:
        return model.head

    def frozen_while_wrapping(self) -> bool:
        return True

    def wrap(self, acc: Accelerator, model: TransferModel, optimizer,
             cfg: TrainConfig) -> tuple[Stages, torch.optim.Optimizer]:
        call, ddp, optimizer = wrap_for_training(acc, model.head, optimizer, compile=cfg.compile)
        return {False: (call, ddp), True: (call, ddp)}, optimizer

    def test(self, acc: Accelerator, model: TransferModel, test_loader, num_classes: int) -> dict:
        """End to end on the test images (what ``best/`` will do), and the head on the cached test
        features beside it: they agree within the features' rounding, or the cache is suspect."""
        test = evaluate(model, test_loader, acc, num_classes)
        cached = evaluate(model.head, self._test_features, acc, num_classes)
        test["accuracy_cached"] = cached["accuracy"]
        dtype = self.features.features["test"].dtype
        acc.print(f"test accuracy {test['accuracy']:.4f} end to end, {cached['accuracy']:.4f} on cached "
                  f"features ({dtype})")
        # Rounding the features may flip a prediction that sits on a decision boundary, not more.
        allowed = max(2, 0.005 * test["samples"]) / max(test["samples"], 1)
        if abs(test["accuracy"] - cached["accuracy"]) > allowed:
            acc.print(f"warning: the cached features disagree with the images by more than {allowed:.4f} "
                      f"accuracy (rounding to {dtype} explains less): was the cache edited, or does the backbone "
                      f"differ from the one that wrote it? Delete {self.features.path} to rebuild it")
        return test


class LinearProbeMode(FeatureMode):
    """``linear_probe``: the features cached as for ``feature_extraction``, and the linear head
    solved on them over an L2 grid (job/linear_probe.py: solve_probe) instead of trained for epochs."""

    solves = True

    def __init__(self, strategy: Strategy):
        super().__init__(strategy)
        self.result: ProbeResult | None = None  # set by solve: the chosen l2, the solve's time and iterations

    def describe(self) -> str:
        return f"{self.strategy.name}, cached features, L-BFGS logistic regression"

    def summary_fields(self) -> dict:
        return self.result.summary() if self.result is not None else {}

    def solve(self, acc: Accelerator, cfg: Config, num_classes: int, preempted: Callable[[], bool],
              trackers) -> ProbeResult:
        """The head's layer, solved on the cached train and val features (the trainer records it)."""
        self.result = solve_probe(acc, cfg, self.features, num_classes, preempted, trackers)
        return self.result


Mode = ImageMode | FeatureMode | LinearProbeMode | TrunkMode


def build_mode(cfg: Config) -> Mode:
    """The one place ``train.strategy`` and ``features.cache`` choose how the run trains:
    ``auto`` caches whenever the backbone is frozen for the whole run; ``trunk.train_from`` caches
    the frozen lower part of a fine-tuned backbone (job/trunk.py)."""
    strategy = Strategy.from_config(cfg.train)
    if cfg.trunk.train_from is not None:  # finetune only (job/config.py)
        return TrunkMode(strategy, cfg.trunk)
    if strategy.name == "linear_probe":  # always cached (job/config.py refuses features.cache=false)
        return LinearProbeMode(strategy)
    if strategy.name == "feature_extraction" and cfg.features.cache != "false":
        return FeatureMode(strategy)
    return ImageMode(strategy)
