"""A seeded, learnable CIFAR-shaped dataset in the official python-batch layout (tests, demos)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from job.atomic import ForeignDirectoryError, atomic_directory, remove_abandoned
from job.data.cifar10 import CIFAR10_CLASSES, CIFAR10_DIR, dump_batch
from job.data.errors import DataError

STAMP = ".synthetic.json"  # marks a directory this writer created: the only kind it replaces
# CIFAR-10's own sizes (50,000 + 10,000 train, 10,000 test). Generation holds ~60 KB of float64
# per image in memory at once (~4 GB at the bound); tests and demos use a few thousand.
MAX_SYNTHETIC_TRAIN = 60_000
MAX_SYNTHETIC_TEST = 10_000


def write_synthetic_cifar(root: Path, *, num_train: int, num_test: int, seed: int,
                          num_classes: int = 10) -> Path:
    """Write (or reuse) ``root/cifar-10-batches-py``.

    Class c is a striped texture at orientation ``c * pi / num_classes`` over a class tint, with
    random phase, frequency jitter, brightness and pixel noise, so a small CNN must learn
    oriented edges and colour rather than memorise pixels.
    """
    if Path(root).exists() and not Path(root).is_dir():
        raise DataError(f"data.root={root} is a file; for data.source=synthetic it is the directory the generated "
                        "batches go to (or null for one beside the store)")
    if num_train > MAX_SYNTHETIC_TRAIN or num_test > MAX_SYNTHETIC_TEST:
        raise DataError(f"synthetic data: num_train={num_train}, num_test={num_test}; at most "
                        f"MAX_SYNTHETIC_TRAIN={MAX_SYNTHETIC_TRAIN} and MAX_SYNTHETIC_TEST={MAX_SYNTHETIC_TEST} "
                        "(CIFAR-10's size): for more, use real data")
    base = Path(root) / CIFAR10_DIR
    params = {"num_train": num_train, "num_test": num_test, "seed": seed, "num_classes": num_classes}
    if _stamp(base) == params:
        remove_abandoned(base)
        return base
    if num_train < 5 * num_classes or num_test < num_classes:
        raise DataError(f"synthetic data needs num_train >= {5 * num_classes} and num_test >= {num_classes}")
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(num_classes)] if num_classes != 10 else list(CIFAR10_CLASSES)
    try:
        with atomic_directory(base, is_ours=lambda p: _stamp(p) is not None) as tmp:
            dump_batch(tmp / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
            train = _synthetic_images(rng, num_train, num_classes)
            for i, chunk in enumerate(np.array_split(np.arange(num_train), 5), start=1):
                dump_batch(tmp / f"data_batch_{i}", {b"data": train[0][chunk], b"labels": train[1][chunk].tolist(),
                                                     b"batch_label": f"synthetic batch {i} of 5".encode()})
            test = _synthetic_images(rng, num_test, num_classes)
            dump_batch(tmp / "test_batch", {b"data": test[0], b"labels": test[1].tolist(),
                                            b"batch_label": b"synthetic test"})
            (tmp / STAMP).write_text(json.dumps(params))
    except ForeignDirectoryError as e:
        raise DataError(f"{e.path} holds files that the synthetic generator did not write; it never replaces "
                        "them: choose another data.root (--root) for synthetic data") from None
    return base


def _stamp(base: Path) -> dict | None:
    try:
        return json.loads((base / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _synthetic_images(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    angle = labels[:, None, None] * np.pi / num_classes
    freq = rng.uniform(0.35, 0.55, size=(n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)  # (n, 32, 32)
    hue = labels / num_classes * 2 * np.pi
    tint = np.stack([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)], axis=1)  # (n, 3)
    brightness = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1))
    img = 128 + brightness * (28 * wave[:, None] + 14 * tint[:, :, None, None])
    img += rng.normal(0, 45, size=img.shape)
    data = np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)  # channel-major rows
    return data, labels.astype(np.int64)
