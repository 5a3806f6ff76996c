"""What each training default costs or buys: the same short runs with one setting changed at a time.

    python bench/defaults.py [--scratch-epochs 5] [--finetune-epochs 2] [--seeds 2] [--only finetune]

On the real CIFAR-10 sample (data/samples: 1,800 train / 200 val / 1,000 test), two settings:
  * from scratch: resnet10t at 32 px, random weights, SGD lr 0.05, cosine;
  * fine-tuning real ImageNet weights: EfficientNet-Lite0 (the packaged weights) at 96 px, all
    layers, SGD lr 0.01 (the default), cosine.
The first row is the job's defaults as they are (linear head, no clipping, no smoothing, the
backbone at the head's LR); every other row changes the listed keys against it. Prints the test
accuracy of each seed and their mean.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.harness import log_beside, run_job
from job.run_dir import RunDir

OLD_HEAD = ("model.head_hidden=[512]", "model.head_dropout=0.3")


def variants() -> list[tuple[str, tuple[str, ...]]]:
    return [
        ("defaults", ()),
        ("+ grad_clip 1.0", ("train.grad_clip=1.0",)),
        ("+ label_smoothing 0.1", ("loss.label_smoothing=0.1",)),
        ("+ 512-unit hidden head, dropout 0.3", OLD_HEAD),
        ("+ backbone LR x0.1", ("optim.backbone_lr_scale=0.1",)),
        ("previous defaults (all four: clip, smoothing, 512 head, x0.1)",
         ("train.grad_clip=1.0", "loss.label_smoothing=0.1", "optim.backbone_lr_scale=0.1", *OLD_HEAD)),
    ]


def run(out: Path, prepared: Path, base: list[str], extra: tuple[str, ...]) -> tuple[float, float]:
    done = run_job([sys.executable, "job/train.py", "--config", "job/configs/demo.yaml", *base,
                    f"train.output_dir={out}", f"data.prepared_dir={prepared}", *extra],
                   log=log_beside(out), label=f"[{out.name}]")
    return RunDir(out).summary().test_accuracy, done.wall_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scratch-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2, help="train.seed 0..N-1 for every row")
    p.add_argument("--only", choices=("scratch", "finetune"), help="one of the two settings")
    args = p.parse_args()
    from job.weights import packaged_efficientnet_lite0

    common = ["train.strategy=finetune", "optim.name=sgd", "optim.weight_decay=1e-4", "schedule.name=cosine",
              "schedule.warmup_epochs=0.5", "early_stopping.patience=0", "tracking.wandb=disabled",
              "model.head_hidden=[]", "model.head_dropout=0.0",
              "train.log_every=1000"]
    settings = {
        "scratch": ("from scratch (resnet10t, 32 px)", common + [
            "model.name=resnet10t", "model.pretrained=false", "model.weights=null", "data.image_size=32",
            "optim.lr=0.05", f"train.epochs={args.scratch_epochs}"]),
        "finetune": ("fine-tuning ImageNet weights (EfficientNet-Lite0, 96 px)", common + [
            "model.name=tf_efficientnet_lite0", f"model.weights={packaged_efficientnet_lite0()}",
            "data.image_size=96", "optim.lr=0.01", f"train.epochs={args.finetune_epochs}"]),
    }
    work = Path(tempfile.mkdtemp(prefix="defaults-bench-"))
    seeds = list(range(args.seeds))
    for key, (name, base) in settings.items():
        if args.only and key != args.only:
            continue
        print(f"\n{name}\n{'variant':62} {'seeds':>14} {'mean':>6} {'s/run':>6}", flush=True)
        for i, (label, extra) in enumerate(variants()):
            results = [run(work / f"{len(name)}-{i}-{seed}", work / "prep", base, (*extra, f"train.seed={seed}"))
                       for seed in seeds]
            accuracies = [a for a, _ in results]
            per_seed = " ".join(f"{a:.3f}" for a in accuracies)
            print(f"{label:62} {per_seed:>14} {statistics.mean(accuracies):6.3f} "
                  f"{statistics.mean(s for _, s in results):6.1f}", flush=True)


if __name__ == "__main__":
    main()
