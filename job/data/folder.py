"""Image folders: ``root/{train,test[,val]}/<class>/*.{jpg,jpeg,png}``, listed, bounded and checked.

Listing is cheap and happens on every run (it is what the store's fingerprint covers, symlink
targets included); decoding every image to check it happens only when the store is (re)built.
Class folder names become labels, never paths to write to.
"""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# What DALI's decoders are asked to read: the content must be JPEG or PNG whatever the file's
# name says (PIL also opens GIF, ICO, TGA... that DALI cannot decode). MPO is a multi-picture
# JPEG, which PIL names separately and DALI decodes as a JPEG.
DECODABLE_FORMATS = {"JPEG", "MPO", "PNG"}
MAX_IMAGE_PIXELS = 50_000_000  # per image, read from the header before decoding (~7000x7000)
MAX_FOLDER_IMAGES = 5_000_000  # per dataset; ImageNet-1k has 1.3 M
MAX_CLASSES = 100_000  # class folders under train/; ImageNet-21k has 21,841
FOLDER_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderListing:
    classes: list[str]
    splits: dict[str, dict]  # split -> {"files": [resolved paths], "labels": int64 array}

    def stats(self) -> list[tuple]:
        """(path, size, mtime) of every file that will be read, after following symlinks."""
        out = []
        for split, data in self.splits.items():
            for f in data["files"]:
                info = os.stat(f)
                out.append((split, f, info.st_size, info.st_mtime_ns))
        return out


def list_image_folder(root: Path, follow_symlinks: bool = False) -> FolderListing:
    """Validate the tree's shape and list its images (no decoding). Symlinks whose target lies
    outside ``root`` are refused unless ``follow_symlinks``; non-regular files always are."""
    root = Path(root)
    real_root = root.resolve()
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(f"{root}: missing {required}/ folder; expected {root}/train/<class>/*.jpg "
                            f"and {root}/test/<class>/*.jpg (optional {root}/val/<class>/...)")

    def checked(path: Path) -> Path:
        if path.is_symlink():
            target = path.resolve()
            if not follow_symlinks and not target.is_relative_to(real_root):
                raise DataError(f"{path}: a symlink to {target}, outside the data root {real_root}; move the "
                                "data inside the root, or allow it with data.follow_symlinks=true "
                                "(--follow-symlinks)")
        return path

    train_dir = checked(root / "train")
    listed = _listed(train_dir, MAX_CLASSES, f"more than MAX_CLASSES={MAX_CLASSES} class folders")
    classes = sorted(p.name for p in listed if checked(p).is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/*.jpg")
    splits, total = {}, 0
    too_many = f"{root} holds more than MAX_FOLDER_IMAGES={MAX_FOLDER_IMAGES} files"
    for split in FOLDER_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        checked(split_dir)
        files, labels = [], []
        for entry in _listed(split_dir, MAX_CLASSES, f"more than MAX_CLASSES={MAX_CLASSES} class folders"):
            if not checked(entry).is_dir():
                raise DataError(f"{entry}: stray file; {split_dir} must hold only class folders")
            if entry.name not in classes:
                raise DataError(f"{entry}: class {entry.name!r} is not among the training classes {classes}")
            images = [checked(p) for p in _listed(entry, MAX_FOLDER_IMAGES - total, too_many)]
            if not images:
                raise DataError(f"{entry}: empty class folder; add images or remove the folder")
            total += len(images)
            for p in images:
                _check_regular_image_file(p)
            files += [str(p.resolve()) for p in images]
            labels += [classes.index(entry.name)] * len(images)
        if not files:
            raise DataError(f"{split_dir}: no images; expected {split_dir}/<class>/*.jpg")
        splits[split] = {"files": files, "labels": np.asarray(labels, dtype=np.int64)}
    return FolderListing(classes=classes, splits=splits)


def _listed(directory: Path, limit: int, too_many: str) -> list[Path]:
    """The non-hidden entries of ``directory``, sorted; refused as soon as there are more than
    ``limit`` (counted while listing, so an absurd folder costs no more than ``limit`` names)."""
    entries = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if len(entries) >= limit:
                raise DataError(f"{directory}: {too_many}; is data.root the dataset's folder?")
            entries.append(Path(entry.path))
    return sorted(entries)


def _check_regular_image_file(p: Path) -> None:
    mode = os.stat(p).st_mode  # follows symlinks: what will be read
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise DataError(f"{p}: {kind}, not an image file; move it out of the dataset")
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{p}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                        "move it out of the dataset")


def check_images(files: list[str]) -> None:
    """Decode every image once (in threads); the first problem is raised as a DataError."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for problem in pool.map(check_image, files):
            if problem:
                raise DataError(problem)


def check_image(path: str) -> str | None:
    """None if ``path`` is a JPEG or PNG that decodes completely within the pixel limit, else a
    message naming the file and the problem."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format not in DECODABLE_FORMATS:
                return (f"{path}: the content is {im.format or 'an unknown format'}, not JPEG or PNG, whatever its "
                        "name says; the data pipeline decodes only JPEG and PNG: convert or remove it")
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                return (f"{path}: {width}x{height} pixels, more than MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS} (a "
                        "decompression bomb, or far larger than training needs); downscale or remove it")
            im.load()  # full decode: catches truncated files that Image.verify() lets through
    except Image.DecompressionBombError as e:
        return f"{path}: refused as a decompression bomb ({e}); downscale or remove it"
    except Exception as e:  # noqa: BLE001 - PIL raises many types on bad files
        return f"{path}: unreadable or truncated image ({e}); fix or remove it"
    return None
