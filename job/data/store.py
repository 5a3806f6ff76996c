"""The prepared store: what the training job reads, built once per input and reused after.

  * raw-pixel sources (cifar10, synthetic): ``{split}_images.npy`` (N, 32, 32, 3) uint8 HWC,
    memory-mapped at train time, plus ``{split}_labels.npy``;
  * encoded sources (folder): ``{split}_files.json`` (absolute paths of the original files,
    decoded later by DALI) plus ``{split}_labels.npy``;
  * ``meta.json``: format, classes, counts and the fingerprint of the inputs. A store whose
    fingerprint matches is reused; otherwise it is rebuilt in a temporary directory and swapped
    in only once complete, so a failed prepare never leaves a partial store nor damages a good one.

A directory is replaced only when it is a store this job wrote (or empty), and a store may
not overlap its data root: a mistyped ``--out`` never deletes a user's files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from job.atomic import ForeignDirectoryError, atomic_directory, remove_abandoned
from job.config import DataConfig
from job.data.cifar10 import cifar_inputs, download_cifar10, read_cifar_python, CIFAR10_URL
from job.data.errors import DataError
from job.data.folder import check_images, list_image_folder
from job.data.synthetic import write_synthetic_cifar

SOURCES = ("cifar10", "folder", "synthetic")
SPLITS = ("train", "val", "test")
STORE_VERSION = 2
WRITER = "cifar-transfer"  # meta.json's mark of a store this job wrote


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
    fingerprint: str

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
    meta = _read_meta(path)
    if meta is None:
        raise DataError(f"{path} is not a prepared store (no readable meta.json); run "
                        f"`python -m job.data prepare ... --out {path}` first")
    return Store(path=path, format=meta["format"], classes=meta["classes"], counts=meta["counts"],
                 fingerprint=meta["fingerprint"])


def prepare_from_config(cfg: DataConfig) -> Store:
    """The store for a run's ``DataConfig`` (prepared if missing or stale), at
    ``{prepared_dir}/{source}``."""
    store, _ = prepare(cfg, Path(cfg.prepared_dir) / cfg.source)
    return store


def prepare(data: DataConfig, out: str | Path, *, url: str | None = None) -> tuple[Store, bool]:
    """Build (or reuse) the store of ``data`` (its source, root, split and synthetic sizes) at
    ``out``. Returns ``(store, reused)``. ``url``: the CIFAR-10 tarball's, for tests."""
    source = data.source
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if not 0.0 < data.val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {data.val_fraction}; training needs a validation "
                        "split (a folder source's val/ folder, when present, replaces it)")
    if data.split_seed < 0:
        raise DataError(f"seed must be >= 0, got {data.split_seed}")
    out = Path(out)
    if source == "synthetic":
        root = Path(data.root or out.parent / f"{out.name}-synthetic-source")
    elif data.root is None:
        raise DataError(f"--root (data.root) is required for source {source!r}")
    else:
        root = Path(data.root)
    # Where the store goes is checked first: a path that cannot be written fails in a second,
    # not after every image was decoded.
    _refuse_overlap(root, out)
    with _named_os_errors("choose another --out (data.prepared_dir)"):
        _refuse_unwritable(out)
        _refuse_foreign(out)
    with _named_os_errors():
        return _build_or_reuse(data, root, out, url=url)


def _build_or_reuse(data: DataConfig, root: Path, out: Path, url: str | None) -> tuple[Store, bool]:
    source, val_fraction, seed = data.source, data.val_fraction, data.split_seed
    if source == "synthetic":
        write_synthetic_cifar(root, num_train=data.synthetic_train, num_test=data.synthetic_test, seed=seed)
    if source == "cifar10" and data.download:
        if root.is_file():
            raise DataError(f"--root {root} is a file, and --download (data.download) needs the directory the "
                            "tarball goes to: drop --download to read this tarball, or give its directory")
        # The tarball lands in root; root stays the directory, so a later run without
        # --download on the same root sees the same inputs and reuses the store.
        download_cifar10(root, url=url or os.environ.get("CIFAR10_URL", CIFAR10_URL))
    if not root.exists():
        hint = " (or add --download to fetch it)" if source == "cifar10" else ""
        raise DataError(f"data root {root} does not exist{hint}")

    listing = list_image_folder(root, data.follow_symlinks) if source == "folder" else None
    inputs = listing.stats() if listing else [(str(p.resolve()), *_size_mtime(p)) for p in cifar_inputs(root)]
    fingerprint = _fingerprint(source, root, inputs, val_fraction=val_fraction, seed=seed)
    meta = _read_meta(out)
    if meta is not None and meta.get("fingerprint") == fingerprint and meta.get("version") == STORE_VERSION:
        remove_abandoned(out)
        return load_store(out), True

    if listing is not None:
        fmt, classes, splits = "encoded", listing.classes, listing.splits
        check_images([f for s in splits.values() for f in s["files"]])
    else:
        fmt, (classes, splits) = "raw", read_cifar_python(root)
    if len(classes) < 2:
        raise DataError(f"{root}: found a single class ({classes[0]!r}); classification needs at least 2")
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, seed)
    _check_splits(root, classes, splits, val_fraction)
    _write_store(out, fmt, classes, splits, fingerprint, source)
    return load_store(out), False


@contextlib.contextmanager
def _named_os_errors(fix: str = "check its permissions and links, or move it out of the dataset") -> Iterator[None]:
    """An OS error on an input (no permission, a dangling link, a symlink loop) or on the store
    being written becomes a DataError that names the file and ``fix``, instead of a traceback."""
    try:
        yield
    except ForeignDirectoryError:  # has its own message
        raise
    except OSError as e:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
        raise DataError(f"{where}: {e.strerror or e}; {fix}") from None
    except RuntimeError as e:
        if not str(e).startswith("Symlink loop"):  # Path.resolve's way of saying ELOOP (Python < 3.13)
            raise
        link = str(e).removeprefix("Symlink loop from ").strip("'")
        raise DataError(f"{link}: a symlink loop; fix or remove the link") from None


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


def _check_splits(root: Path, classes: list[str], splits: dict, val_fraction: float) -> None:
    """Refuse now what training could only refuse after its epochs: an empty split, or a class
    with no training image."""
    counts = {name: np.bincount(np.asarray(splits[name]["labels"], dtype=np.int64), minlength=len(classes))
              for name in SPLITS}
    table = "; ".join(f"{c}: train {counts['train'][i]}, val {counts['val'][i]}, test {counts['test'][i]}"
                      for i, c in enumerate(classes))
    empty = [c for i, c in enumerate(classes) if counts["train"][i] == 0]
    if empty:
        raise DataError(f"{root}: no training image left for class(es) {', '.join(empty)} after holding out "
                        f"val_fraction={val_fraction}; lower the fraction or add images. Counts per class: {table}")
    for name in ("val", "test"):
        if counts[name].sum() == 0:
            fix = ("raise val_fraction or add images to val/" if name == "val" else "add images to test/")
            raise DataError(f"{root}: the {name} split is empty; {fix}. Counts per class: {table}")


def _write_store(out: Path, fmt: str, classes: list[str], splits: dict, fingerprint: str, source: str) -> None:
    """Written into a temporary directory swapped in when complete (job/atomic.py)."""
    try:
        with _named_os_errors(f"check free space and permissions where the store goes ({out})"), \
                atomic_directory(out, is_ours=lambda p: _read_meta(p) is not None) as tmp:
            for name, data in splits.items():
                np.save(tmp / f"{name}_labels.npy", np.asarray(data["labels"], dtype=np.int64))
                if fmt == "raw":
                    np.save(tmp / f"{name}_images.npy", np.ascontiguousarray(data["images"]))
                else:
                    (tmp / f"{name}_files.json").write_text(json.dumps(data["files"]))
            meta = {"writer": WRITER, "version": STORE_VERSION, "format": fmt, "source": source,
                    "classes": classes, "counts": {k: int(len(splits[k]["labels"])) for k in SPLITS},
                    "fingerprint": fingerprint}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    except ForeignDirectoryError as e:
        raise DataError(_foreign_message(e)) from None


def _read_meta(path: Path) -> dict | None:
    """The store's metadata if ``path`` is a store this job wrote, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    return meta if isinstance(meta, dict) and meta.get("writer") == WRITER else None


def _refuse_unwritable(out: Path) -> None:
    """``out`` must be creatable: its nearest existing parent a directory we may write to. Not
    asked of a store this job wrote: it is reused from read-only mounts (training pods mount the
    data volume read-only), and should it need a rebuild there, the write is refused, named."""
    if _read_meta(out) is not None:
        return
    parent = next(p for p in out.absolute().parents if p.exists() or p.is_symlink())
    if not parent.is_dir():
        raise DataError(f"--out (data.prepared_dir) {out} is inside {parent}, which is not a directory; choose "
                        "another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out (data.prepared_dir) {out}: {parent} is not writable; choose a writable path")


def _refuse_foreign(out: Path) -> None:
    """Fail before any expensive work if ``out`` could not be replaced at the end."""
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise DataError(_foreign_message(ForeignDirectoryError(out, "exists and is not a directory")))
    if out.is_dir() and not os.access(out, os.R_OK | os.X_OK):
        raise DataError(f"--out (data.prepared_dir) {out} is not readable; choose another path")
    if out.is_dir() and any(out.iterdir()) and _read_meta(out) is None:
        raise DataError(_foreign_message(ForeignDirectoryError(out, "is a non-empty directory that this job "
                                                                     "did not write")))


def _foreign_message(e: ForeignDirectoryError) -> str:
    return (f"refusing to write the prepared store to {e.path}: it {e.why} (no store meta.json). Nothing was "
            "changed; choose an empty or new directory for --out (data.prepared_dir)")


def _refuse_overlap(root: Path, out: Path) -> None:
    with _named_os_errors():
        a, b = root.resolve(), out.resolve()
    if a == b or b.is_relative_to(a) or a.is_relative_to(b):
        raise DataError(f"the store {out} and the data root {root} overlap (one is inside the other); writing the "
                        "store there could replace the dataset. Put data.prepared_dir (--out) outside data.root")


def _size_mtime(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _fingerprint(source: str, root: Path, inputs: list[tuple], **params) -> str:
    """Hash of the parameters and of every file that is read: resolved path, size and mtime."""
    blob = json.dumps({"source": source, "root": str(root.resolve()), "params": params, "files": inputs,
                       "version": STORE_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()
