"""Partial fine-tuning over a cached trunk (``trunk.train_from``): the backbone's modules before
that one are frozen, their output maps of every training and validation image are computed once
and cached like the pooled features (job/features.py: same key rules, same sharded extraction,
same atomic write), and the modules from ``train_from`` on train with the head over the cache,
every epoch. ``trunk.views=2`` caches each training image's mirror image too; each epoch draws
one of the two per sample (the flip of the image loaders, by the same seeded draw).

What it buys: the frozen modules cost nothing per epoch, so an hour trains the upper modules for
more epochs, or at a larger size (docs/RESULTS.md). What it costs: no augmentation but the flip,
and the frozen modules keep their ImageNet weights. The test runs end to end on images, through
the whole network, as ``best/`` will.

    python -m job.trunk tf_efficientnet_lite0 --image-size 160    # the names train_from accepts
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from dali_pipelines import sampling
from job.config import ConfigError, TrainConfig, TrunkConfig
from job.distributed import wrap_for_training
from job.features import Extraction, FeatureLoader, FeatureSet, cached_features, feature_key
from job.loop import evaluate
from job.model import Strategy, TransferModel
from job.storage import feature_cache_root

# Children of a timm backbone that its forward_features never calls (the classifier side).
NOT_FEATURES = ("global_pool", "classifier", "head", "head_drop", "fc", "fc_norm", "classif", "last_linear")


def backbone_units(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """``forward_features`` as a chain of named modules: the backbone's children in order, each
    ``nn.Sequential`` of stages (EfficientNet's ``blocks``) expanded into its stages. Trusted
    only once ``split_backbone`` has checked the chain against ``forward_features``."""
    units = []
    for name, child in backbone.named_children():
        if name in NOT_FEATURES:
            continue
        if isinstance(child, nn.Sequential) and len(child) > 1:
            units += [(f"{name}.{i}", stage) for i, stage in enumerate(child)]
        else:
            units.append((name, child))
    return units


class Upper(nn.Module):
    """The modules from ``train_from`` on, then the head: what trains over the cached maps. It holds
    the model's own modules (no copies), so the whole model's weights are the trained ones."""

    def __init__(self, units: list[nn.Module], head: nn.Module):
        super().__init__()
        self.units, self.head = nn.Sequential(*units), head

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(maps))


@dataclass
class Split:
    trunk: nn.Sequential  # frozen, cached
    upper: Upper  # trains
    map_shape: tuple[int, int, int]  # (C, H, W) of the trunk's output at the run's image size


def split_backbone(model: TransferModel, train_from: str, image_size: int) -> Split:
    """The trunk before module ``train_from`` and the rest, checked on one image: trunk then upper
    must give the model's own output (else the architecture's forward is not a plain chain of its
    modules, and a cut there would train something else)."""
    units = backbone_units(model.backbone)
    names = [name for name, _ in units]
    if train_from not in names[1:]:
        kind = model.backbone.__class__.__name__
        raise ConfigError(f"trunk.train_from={train_from!r} is not a module {kind} can be cut at; one of: "
                          f"{', '.join(names[1:])} (`python -m job.trunk MODEL` lists them with their output "
                          "sizes), or null to train every layer")
    cut = names.index(train_from)
    trunk, upper = nn.Sequential(*[m for _, m in units[:cut]]), Upper([m for _, m in units[cut:]], model.head)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
            x = x.to(next(model.parameters()).device)
            maps = trunk(x)
            whole, chained = model(x), upper(maps)
    finally:
        model.train(was_training)
    if not torch.allclose(whole, chained, rtol=1e-4, atol=1e-4):
        raise ConfigError(f"trunk.train_from: {model.backbone.__class__.__name__}'s forward is not the chain of its "
                          "modules, so it cannot be cut; set trunk.train_from=null")
    return Split(trunk, upper, tuple(maps.shape[1:]))


def translate(maps: torch.Tensor, cells: np.ndarray) -> torch.Tensor:
    """Each map (B, C, H, W) moved by its (x, y) whole cells, zero-filled where it came from outside."""
    pad = int(np.abs(cells).max(initial=0))
    if pad == 0:
        return maps
    height, width = maps.shape[-2:]
    padded = torch.nn.functional.pad(maps, (pad, pad, pad, pad))
    return torch.stack([padded[i, :, pad - dy:pad - dy + height, pad - dx:pad - dx + width]
                        for i, (dx, dy) in enumerate(cells.tolist())])


class TrunkLoader(FeatureLoader):
    """The feature cache's loader over cached maps (N, views, C, H, W): a training batch takes each
    sample's view from the epoch's flip draw (view 1 is the mirror image's maps) and, with ``shift``,
    moves its maps by the epoch's shift draw in whole cells (``translate``); evaluation reads view 0
    as it is. Channels_last if asked."""

    def __init__(self, maps: np.ndarray, labels: np.ndarray, *, train: bool, shard: sampling.Shard, device,
                 channels_last: bool, shift: bool = False):
        super().__init__(maps, labels, train=train, shard=shard, device=device,
                         augment=train and (maps.shape[1] > 1 or shift))
        self.shift = train and shift
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def rows(self, idx: np.ndarray, positions: np.ndarray, aug: sampling.Augmentation | None) -> torch.Tensor:
        two_views = aug is not None and self.features.shape[1] > 1
        views = aug.flip[positions] if two_views else np.zeros(len(idx), dtype=np.int64)
        x = torch.from_numpy(np.asarray(self.features[idx, views]))
        if self.shift:  # a fraction of the side -> whole cells of these maps
            x = translate(x, np.rint(aug.shift[positions] * np.array(x.shape[-1:-3:-1])).astype(np.int64))
        return x


def trunk_extraction(model: nn.Module, trunk: nn.Module, map_shape: tuple[int, ...], views: int) -> Extraction:
    """Train: each image's maps, and its mirror image's as a second view; val: the image's."""
    def both(images: torch.Tensor) -> torch.Tensor:
        maps = [trunk(images)] + ([trunk(images.flip(-1))] if views == 2 else [])
        return torch.stack(maps, 1)

    return Extraction(model, {"train": (both, (views, *map_shape)),
                              "val": (lambda images: trunk(images).unsqueeze(1), (1, *map_shape))})


class TrunkMode:
    """``trunk.train_from`` set (job/modes.py: build_mode): the upper modules and the head train over
    the cached trunk maps; the test runs end to end on images."""

    augments = False  # the cached maps are of unaugmented images (and their mirror images)
    cached = True
    solves = False

    def __init__(self, strategy: Strategy, cfg: TrunkConfig):
        self.strategy, self.cfg = strategy, cfg
        self.split: Split | None = None
        self.features: FeatureSet | None = None

    def describe(self) -> str:
        shift = ", shifted" if self.cfg.shift else ""
        return f"{self.strategy.name} from {self.cfg.train_from}, cached trunk ({self.cfg.views} view(s){shift})"

    def summary_fields(self) -> dict:
        return {}

    @property
    def extraction_seconds(self) -> float | None:
        return self.features.extraction_seconds if self.features is not None else None

    def loaders(self, inputs) -> dict:
        acc, cfg, model = inputs.accelerator, inputs.cfg, inputs.model
        self.split = split_backbone(model, self.cfg.train_from, inputs.spec.prep.image_size)
        self.split.trunk.requires_grad_(False)
        key = feature_key(cfg, inputs.spec.prep, inputs.store, precision=acc.mixed_precision,
                          rows=f"trunk:{self.cfg.train_from}:views={self.cfg.views}")
        extraction = trunk_extraction(model, self.split.trunk, self.split.map_shape, self.cfg.views)
        self.features = cached_features(acc, extraction, inputs.store, inputs.spec, key, feature_cache_root(cfg),
                                        cfg.data.batch_size, inputs.stop_requested)
        verb = ("reusing the cached trunk" if self.features.reused else
                f"cached the trunk's maps in {self.features.extraction_seconds:.1f}s")
        acc.print(f"{verb}: {self.split.map_shape} per view, {self.features.path}")
        return {split: TrunkLoader(self.features.features[split], self.features.labels[split],
                                   train=split == "train", shard=inputs.shard, device=acc.device,
                                   channels_last=cfg.train.channels_last, shift=self.cfg.shift)
                for split in ("train", "val")}

    def trainable(self, model: TransferModel) -> nn.Module:
        return self.split.upper

    def evaluated(self, model: TransferModel) -> nn.Module:
        return self.split.upper

    def frozen_while_wrapping(self) -> bool:
        return False

    def wrap(self, acc: Accelerator, model: TransferModel, optimizer, cfg: TrainConfig):
        # The whole backbone was just unfrozen (Trainer.setup): the trunk never trains, and DDP must
        # register only what does.
        self.split.trunk.requires_grad_(False)
        call, ddp, optimizer = wrap_for_training(acc, self.split.upper, optimizer, compile=cfg.compile)
        return {False: (call, ddp), True: (call, ddp)}, optimizer

    def test(self, acc: Accelerator, model: TransferModel, test_loader, num_classes: int) -> dict:
        """End to end on the test images, through the trunk and the rest: what ``best/`` will do."""
        return evaluate(model, test_loader, acc, num_classes)


def main(argv: list[str] | None = None) -> None:
    from job.config import ModelConfig
    from job.model import create_model

    ap = argparse.ArgumentParser(description="The modules trunk.train_from can name, with their output sizes.")
    ap.add_argument("model", help="a timm model name, e.g. tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=None, help="input size (default: the pretrained size)")
    args = ap.parse_args(argv)
    model, prep = create_model(ModelConfig(name=args.model, pretrained=False), 10, args.image_size)
    x = torch.zeros(1, 3, prep.image_size, prep.image_size)
    units = backbone_units(model.eval().backbone)
    print(f"{args.model} at {prep.image_size} px: trunk.train_from=NAME freezes the modules before NAME and "
          "caches their output")
    print(f"  {'NAME':<14} {'cached per view':<16} backbone params that train")
    with torch.no_grad(), torch.inference_mode():
        for i, (name, unit) in enumerate(units):
            trains = sum(p.numel() for _, later in units[i:] for p in later.parameters())
            if i:
                print(f"  {name:<14} {tuple(x.shape[1:])!s:<16} {trains / 1e6:.2f}M")
            x = unit(x)


if __name__ == "__main__":
    main()
