"""What each training default costs or buys: the same short runs with one setting changed at a time.

    python bench/defaults.py [--scratch-epochs 5] [--finetune-epochs 2]

On the real CIFAR-10 sample (data/samples: 1,800 train / 200 val / 1,000 test), two settings:
  * from scratch: resnet10t at 32 px, random weights, SGD lr 0.05, cosine;
  * fine-tuning real ImageNet weights: EfficientNet-Lite0 (the packaged weights) at 96 px, all
    layers, SGD lr 0.01 (the default), cosine.
Every row uses a 512-unit hidden head with dropout 0.3 unless it says otherwise, and changes the
listed keys against the job's defaults; prints test accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREVIOUS = ("train.grad_clip=1.0", "loss.label_smoothing=0.1", "optim.backbone_lr_scale=0.1")
VARIANTS = [
    ("current defaults", ()),
    ("previous defaults (clip 1.0, smoothing 0.1, backbone LR x0.1)", PREVIOUS),
    ("+ grad_clip 1.0", ("train.grad_clip=1.0",)),
    ("+ label_smoothing 0.1", ("loss.label_smoothing=0.1",)),
    ("+ linear head (head_hidden [], no dropout)", ("model.head_hidden=[]", "model.head_dropout=0.0")),
]


def run(out: Path, prepared: Path, base: list[str], extra: tuple[str, ...]) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "job/train.py", "--config", "job/configs/demo.yaml", *base,
                    f"train.output_dir={out}", f"data.prepared_dir={prepared}", *extra],
                   cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads((out / "metrics.json").read_text())["test_accuracy"], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scratch-epochs", type=int, default=5)
    p.add_argument("--finetune-epochs", type=int, default=2)
    args = p.parse_args()
    from job.weights import packaged_efficientnet_lite0

    common = ["train.strategy=finetune", "optim.name=sgd", "optim.weight_decay=1e-4", "schedule.name=cosine",
              "schedule.warmup_epochs=0.5", "early_stopping.patience=0", "tracking.wandb=disabled",
              "model.head_hidden=[512]", "model.head_dropout=0.3", "train.log_every=1000"]
    settings = {
        "from scratch (resnet10t, 32 px)": common + [
            "model.name=resnet10t", "model.pretrained=false", "model.weights=null", "data.image_size=32",
            "optim.lr=0.05", f"train.epochs={args.scratch_epochs}"],
        "fine-tuning ImageNet weights (EfficientNet-Lite0, 96 px)": common + [
            "model.name=tf_efficientnet_lite0", f"model.weights={packaged_efficientnet_lite0()}",
            "data.image_size=96", "optim.lr=0.01", f"train.epochs={args.finetune_epochs}"],
    }
    work = Path(tempfile.mkdtemp(prefix="defaults-bench-"))
    for name, base in settings.items():
        print(f"\n{name}\n{'variant':62} {'test acc':>8} {'seconds':>8}", flush=True)
        for i, (label, extra) in enumerate(VARIANTS):
            accuracy, seconds = run(work / f"{len(name)}-{i}", work / "prep", base, extra)
            print(f"{label:62} {accuracy:8.3f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
