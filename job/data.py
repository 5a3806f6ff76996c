"""Data acquisition: CIFAR-10 / image-folder / synthetic sources -> a validated, prepared store.

The store is what makes the DALI pipelines simplest and fastest:
  * raw-pixel sources (cifar10, synthetic): ``{split}_images.npy`` (N, 32, 32, 3) uint8 HWC,
    memory-mapped at train time, plus ``{split}_labels.npy``;
  * encoded sources (folder): ``{split}_files.json`` (absolute paths of the original files,
    decoded later by DALI) plus ``{split}_labels.npy``;
  * ``meta.json``: format, classes, counts and the fingerprint of the inputs. A store whose
    fingerprint matches is reused; otherwise it is rebuilt in a temporary directory and swapped
    in only once complete, so a failed prepare never leaves a partial store nor damages a good one.

CLI: ``python -m job.data prepare --source {cifar10,folder,synthetic} --root PATH --out DIR``
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.atomic import atomic_directory

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SOURCES = ("cifar10", "folder", "synthetic")
SPLITS = ("train", "val", "test")
STORE_VERSION = 1


class DataError(Exception):
    """Bad or unavailable input data; the message names the file and the fix."""


@dataclass(frozen=True)
class Split:
    """One split of a prepared store: raw pixels (``images``) or encoded files (``files``)."""

    labels: np.ndarray
    images: np.ndarray | None = None  # (N, H, W, 3) uint8, memory-mapped
    files: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Store:
    """A prepared dataset, as read back from disk by the training job."""

    path: Path
    format: str  # "raw" | "encoded"
    classes: list[str]
    counts: dict[str, int]

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        labels = np.load(self.path / f"{name}_labels.npy")
        if self.format == "raw":
            return Split(labels=labels, images=np.load(self.path / f"{name}_images.npy", mmap_mode="r"))
        files = json.loads((self.path / f"{name}_files.json").read_text())
        return Split(labels=labels, files=files)


def load_store(path: str | Path) -> Store:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{path} is not a prepared store (no meta.json); run "
                        f"`python -m job.data prepare ... --out {path}` first") from None
    return Store(path=path, format=meta["format"], classes=meta["classes"], counts=meta["counts"])


# ----------------------------------------------------------------------------- prepare

def prepare(source: str, root: str | Path | None, out: str | Path, *, val_fraction: float = 0.1,
            seed: int = 0, download: bool = False, num_train: int = 5000, num_test: int = 1000,
            url: str | None = None) -> tuple[Store, bool]:
    """Build (or reuse) the store for ``source`` at ``out``. Returns ``(store, reused)``."""
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if source == "synthetic":
        root = Path(root) if root else out.parent / f"{out.name}-synthetic-source"
        write_synthetic_cifar(root, num_train=num_train, num_test=num_test, seed=seed)
    elif root is None:
        raise DataError(f"--root is required for source {source!r}")
    root = Path(root)
    if source == "cifar10" and download:
        # The tarball lands in root; root stays the directory, so a later run without
        # --download on the same root sees the same inputs and reuses the store.
        download_cifar10(root, url=url or os.environ.get("CIFAR10_URL", CIFAR10_URL))
    if not root.exists():
        hint = " (or add --download to fetch it)" if source == "cifar10" else ""
        raise DataError(f"data root {root} does not exist{hint}")

    fingerprint = _fingerprint(source, root, val_fraction=val_fraction, seed=seed)
    if (out / "meta.json").exists():
        try:
            meta = json.loads((out / "meta.json").read_text())
            if meta.get("fingerprint") == fingerprint and meta.get("version") == STORE_VERSION:
                return load_store(out), True
        except (json.JSONDecodeError, KeyError):
            pass  # unreadable metadata: rebuild

    if source == "folder":
        fmt, (classes, splits) = "encoded", read_image_folder(root)
    else:
        fmt, (classes, splits) = "raw", read_cifar_python(root)
    if len(classes) < 2:
        raise DataError(f"{root}: found a single class ({classes[0]!r}); classification needs at least 2")
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    _write_store(out, fmt, classes, splits, fingerprint, source)
    return load_store(out), False


def stratified_split(data: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    """Hold out ``round(val_fraction * n_c)`` samples of every class c, chosen with ``seed``."""
    labels = data["labels"]
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val_idx.append(rng.permutation(idx)[: int(round(val_fraction * len(idx)))])
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[np.concatenate(val_idx)] = True

    def take(mask: np.ndarray) -> dict:
        return {k: (v[mask] if isinstance(v, np.ndarray) else [x for x, m in zip(v, mask) if m])
                for k, v in data.items()}

    return take(~val_mask), take(val_mask)


def _write_store(out: Path, fmt: str, classes: list[str], splits: dict, fingerprint: str,
                 source: str) -> None:
    """Written into a temporary directory swapped in when complete (job/atomic.py)."""
    with atomic_directory(out) as tmp:
        for name, data in splits.items():
            np.save(tmp / f"{name}_labels.npy", np.asarray(data["labels"], dtype=np.int64))
            if fmt == "raw":
                np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(data["images"]))
            else:
                (tmp / f"{name}_files.json").write_text(json.dumps(data["files"]))
        meta = {"version": STORE_VERSION, "format": fmt, "source": source, "classes": classes,
                "counts": {k: int(len(splits[k]["labels"])) for k in SPLITS if k in splits},
                "fingerprint": fingerprint}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _fingerprint(source: str, root: Path, **params) -> str:
    """Hash of the parameters and of every input file's name, size and mtime."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size,
                p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"source": source, "root": str(root.resolve()), "params": params,
                       "files": listing, "version": STORE_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- CIFAR-10

def read_cifar_python(root: Path) -> tuple[list[str], dict]:
    """Read the official python-batch layout from a directory or a ``.tar.gz``; validate it all."""
    if root.is_file():
        members = _read_tarball(root)
        where = lambda name: f"{root}:{CIFAR10_DIR}/{name}"  # noqa: E731
    else:
        base = root / CIFAR10_DIR if (root / CIFAR10_DIR).is_dir() else root
        if not (base / "batches.meta").exists() and (root / CIFAR10_TARBALL).is_file():
            return read_cifar_python(root / CIFAR10_TARBALL)
        members = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
        where = lambda name: str(base / name)  # noqa: E731

    required = (*CIFAR10_TRAIN_BATCHES, "test_batch")
    missing = [n for n in required if n not in members]
    if missing:
        raise DataError(f"missing CIFAR-10 batch file(s) {', '.join(where(n) for n in missing)}: "
                        f"expected {', '.join(required)} (the official python version)")
    classes = list(CIFAR10_CLASSES)
    if "batches.meta" in members:
        meta = _unpickle(members["batches.meta"], where("batches.meta"))
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names:
            raise DataError(f"{where('batches.meta')}: no b'label_names' list")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def batch(names: tuple[str, ...]) -> dict:
        parts = [_read_batch(members[n], where(n), len(classes)) for n in names]
        return {"images": np.concatenate([p[0] for p in parts]),
                "labels": np.concatenate([p[1] for p in parts])}

    return classes, {"train": batch(CIFAR10_TRAIN_BATCHES), "test": batch(("test_batch",))}


def _read_tarball(path: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            return {Path(m.name).name: tar.extractfile(m).read()
                    for m in tar.getmembers() if m.isfile() and Path(m.name).parent.name == CIFAR10_DIR}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated tarball ({e}); download it again "
                        f"({CIFAR10_URL}, md5 {CIFAR10_MD5})") from None


def _unpickle(blob: bytes, where: str):
    try:
        return pickle.load(io.BytesIO(blob), encoding="bytes")
    except Exception as e:  # noqa: BLE001 - pickle raises many types on garbage
        raise DataError(f"{where}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from None


def _read_batch(blob: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(blob, where)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{where}: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' has shape {data.shape} and dtype {data.dtype}; "
                        "expected (N, 3072) uint8 (32x32 RGB, channel-major)")
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {len(labels)} labels for {len(data)} images")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} out of range [0, {num_classes})")
    # Channel-major rows -> HWC, the layout DALI's image operators expect.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int64)


def download_cifar10(dest_dir: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Fetch the official tarball into ``dest_dir``, resuming a partial ``.part`` download."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / CIFAR10_TARBALL
    if target.exists():
        if _md5(target) == md5:
            return target
        target.unlink()  # stale or damaged: fetch again
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = offset and getattr(response, "status", 200) == 206
            with open(part, "ab" if resumed else "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download CIFAR-10 from {url} ({getattr(e, 'reason', e)}). Without internet, "
            f"fetch {CIFAR10_TARBALL} elsewhere (md5 {md5}) and pass it with "
            f"`--root /path/to/{CIFAR10_TARBALL}` (or data.root=...) instead of --download") from None
    digest = _md5(part)
    if digest != md5:
        part.unlink()
        raise DataError(f"md5 mismatch for {url}: got {digest}, expected {md5}; the download was "
                        "deleted, run again to retry or supply the tarball with --root")
    part.rename(target)
    return target


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- image folders

def read_image_folder(root: Path) -> tuple[list[str], dict]:
    """``root/{train,test[,val]}/<class>/*.{jpg,jpeg,png}``; every image is decoded once to check it."""
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(f"{root}: missing {required}/ folder; expected {root}/train/<class>/*.jpg "
                            f"and {root}/test/<class>/*.jpg (optional {root}/val/<class>/...)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders")
    splits = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        files, labels = [], []
        for entry in sorted(split_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                raise DataError(f"{entry}: stray file; {split_dir} must hold only class folders")
            if entry.name not in classes:
                raise DataError(f"{entry}: class {entry.name!r} is not among the training classes {classes}")
            images = [p for p in sorted(entry.iterdir()) if not p.name.startswith(".")]
            if not images:
                raise DataError(f"{entry}: empty class folder; add images or remove the folder")
            for p in images:
                if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise DataError(f"{p}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                                    "move it out of the dataset")
            files += [str(p.resolve()) for p in images]
            labels += [classes.index(entry.name)] * len(images)
        splits[split] = {"files": files, "labels": np.asarray(labels, dtype=np.int64)}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for problem in pool.map(check_image, [f for s in splits.values() for f in s["files"]]):
            if problem:
                raise DataError(problem)
    return classes, splits


def check_image(path: str) -> str | None:
    """None if ``path`` decodes completely, else a message naming the file and the problem."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that Image.verify() lets through
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad files
        return f"{path}: unreadable or truncated image ({e}); fix or remove it"
    return None


# ----------------------------------------------------------------------------- synthetic

def write_synthetic_cifar(root: Path, *, num_train: int = 5000, num_test: int = 1000,
                          seed: int = 0, num_classes: int = 10) -> Path:
    """A seeded, learnable CIFAR-shaped dataset in the official python-batch layout.

    Class c is a striped texture at orientation ``c * pi / num_classes`` over a class tint, with
    random phase, frequency jitter, brightness and pixel noise, so a small CNN must learn
    oriented edges and colour rather than memorise pixels.
    """
    base = root / CIFAR10_DIR
    stamp = base / ".synthetic.json"
    params = {"num_train": num_train, "num_test": num_test, "seed": seed, "num_classes": num_classes}
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return base
    if num_train < 5 * num_classes or num_test < num_classes:
        raise DataError(f"synthetic data needs num_train >= {5 * num_classes} and num_test >= {num_classes}")
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(num_classes)] if num_classes != 10 else list(CIFAR10_CLASSES)
    with atomic_directory(base) as tmp:
        _dump(tmp / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
        train = _synthetic_images(rng, num_train, num_classes)
        for i, chunk in enumerate(np.array_split(np.arange(num_train), 5), start=1):
            _dump(tmp / f"data_batch_{i}", {b"data": train[0][chunk], b"labels": train[1][chunk].tolist(),
                                            b"batch_label": f"synthetic batch {i} of 5".encode()})
        test = _synthetic_images(rng, num_test, num_classes)
        _dump(tmp / "test_batch", {b"data": test[0], b"labels": test[1].tolist(), b"batch_label": b"synthetic test"})
        (tmp / ".synthetic.json").write_text(json.dumps(params))
    return base


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


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate a source and write the prepared store")
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--root", help="cifar10: cifar-10-batches-py dir or .tar.gz (download dir with "
                                  "--download); folder: dir with train/ and test/; synthetic: where "
                                  "to write the generated batches")
    p.add_argument("--out", required=True, help="directory of the prepared store")
    p.add_argument("--download", action="store_true", help="cifar10: fetch the official tarball into --root")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and synthetic data")
    p.add_argument("--num-train", type=int, default=5000, help="synthetic: training images")
    p.add_argument("--num-test", type=int, default=1000, help="synthetic: test images")
    args = parser.parse_args(argv)
    try:
        store, reused = prepare(args.source, args.root, args.out, val_fraction=args.val_fraction,
                                seed=args.seed, download=args.download,
                                num_train=args.num_train, num_test=args.num_test)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"store": str(store.path), "source": args.source, "reused": reused,
                      "counts": store.counts, "classes": store.classes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- loaders

def prepare_from_config(cfg) -> Store:
    """The store for a run's ``DataConfig`` (prepared if missing or stale)."""
    store, _ = prepare(cfg.source, cfg.root, Path(cfg.prepared_dir) / cfg.source,
                       val_fraction=cfg.val_fraction, seed=cfg.split_seed, download=cfg.download,
                       num_train=cfg.synthetic_train, num_test=cfg.synthetic_test)
    return store


def make_loader(store: Store, split: str, spec, *, train: bool, batch_size: int, rank: int,
                world_size: int, seed: int):
    """A DaliLoader over one split of ``store`` for one rank."""
    from dali_pipelines.loader import DaliLoader

    data = store.split(split)
    if len(data) == 0:
        raise DataError(f"{store.path}: split {split!r} is empty; check data.val_fraction and the source")
    return DaliLoader(labels=data.labels, images=data.images, files=data.files, spec=spec, train=train,
                      batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
