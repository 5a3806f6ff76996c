"""Feature extraction with and without the feature cache: the same config, the same images.

    python bench/feature_cache.py [--size 224] [--epochs 3] [--images 500]

Runs job/train.py twice on the real JPEG sample (data/samples/cifar10-folder-mini, the first
``--images`` training images per the store's split) with ImageNet-trained EfficientNet-Lite0
frozen at its pretrained input size: once with ``features.cache=false`` (every epoch
pushes every image through the backbone; augmentation off so both runs see the same inputs),
once cached (one backbone pass, then the head on stored features). Prints the per-epoch times
and, last, ``speedup cached/uncached per epoch = X.X`` over the epochs after the first.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.harness import REPO, log_beside, run_job
from job.records import EpochRecord, shown_epoch
from job.run_dir import RunDir



def train(out: Path, prepared: Path, args, *extra: str) -> tuple[list[EpochRecord], float]:
    from job.weights import packaged_efficientnet_lite0

    command = [sys.executable, "job/train.py", "--config", "job/configs/demo.yaml", f"train.output_dir={out}",
               f"data.prepared_dir={prepared}", "data.source=folder", f"data.root={args.data}",
               "data.val_fraction=0.1", f"data.image_size={args.size}",
               f"model.weights={packaged_efficientnet_lite0()}",
               f"train.epochs={args.epochs}", "early_stopping.patience=0", "tracking.wandb=disabled", *extra]
    done = run_job(command, log=log_beside(out), label=f"[{out.name}]")
    return RunDir(out).epochs(), done.wall_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224, help="input size (Lite0's pretrained size: 224)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=500, help="training images (a subset of the JPEG sample)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="feature-cache-bench-"))
    args.data = work / "images"
    source = REPO / "data" / "samples" / "cifar10-folder-mini"
    for split, count in (("train", args.images), ("test", max(args.images // 5, 10))):
        classes = sorted(p.name for p in (source / split).iterdir())
        for i, cls in enumerate(classes):
            (args.data / split / cls).mkdir(parents=True)
            files = sorted((source / split / cls).iterdir())[: count // len(classes) + (i < count % len(classes))]
            for f in files:
                shutil.copy(f, args.data / split / cls / f.name)
    uncached, uncached_wall = train(work / "uncached", work / "prep", args, "features.cache=false",
                                    "data.augment=false")
    cached, cached_wall = train(work / "cached", work / "prep", args)
    extraction = RunDir(work / "cached").summary().feature_extraction_seconds
    print(f"tf_efficientnet_lite0 frozen, {args.size}px, {uncached[0].train_samples} training images, "
          f"{args.epochs} epochs, CPU threads: {__import__('torch').get_num_threads()}")
    print(f"{'epoch':>5}  {'uncached s':>10}  {'cached s':>10}")
    for a, b in zip(uncached, cached):
        print(f"{shown_epoch(a.epoch):>5}  {a.epoch_seconds:>10.3f}  {b.epoch_seconds:>10.4f}")
    print(f"one-off feature extraction (train+val+test): {extraction:.1f} s; whole runs: uncached "
          f"{uncached_wall:.1f} s, cached {cached_wall:.1f} s")
    later = lambda h: statistics.mean(e.epoch_seconds for e in h[1:])  # noqa: E731
    print(f"speedup cached/uncached per epoch = {later(uncached) / later(cached):.1f}")


if __name__ == "__main__":
    main()
