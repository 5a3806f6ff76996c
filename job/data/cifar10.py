"""The official CIFAR-10 python-batch layout: download, tarball and directory reading, validation.

The format *is* pickle, and tarballs come from mirrors users pick (``CIFAR10_URL``) or from
anywhere (``--root some.tar.gz``): a plain ``pickle.load`` would run whatever code a crafted
batch file names. ``_SafeUnpickler`` admits only the globals the official files need (NumPy
array reconstruction), and every read is bounded (``MAX_*``) before anything is decompressed
into memory. Tar members are matched by name and read in memory, never extracted.
"""
from __future__ import annotations

import _compat_pickle
import collections
import gzip
import hashlib
import io
import os
import pickle
import stat
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from job.bounds import shown, within_size
from job.data.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# Bounds on what a tarball or batch directory may make us read. The official files: 5 train
# batches and a test batch of ~31 MB each, ~178 MB in all, 8 tar members.
MAX_BATCH_BYTES = 256 * 2**20  # one batch file (8x the official size)
MAX_TARBALL_BYTES = 2 * 2**30  # all members together, uncompressed
MAX_TARBALL_MEMBERS = 1000
MAX_TAR_HEADER_BYTES = 2**20  # one read while scanning headers (GNU long names, pax records: ~KB)
MAX_DOWNLOAD_BYTES = 1 * 2**30  # the official tarball is 163 MB
# Elements of one unpickled file, counted as its readers walk them (a shared list as often as it
# is referenced): an official batch holds ~20,000 (10,000 labels and file names), and no batch
# under MAX_BATCH_BYTES can hold more than ~90,000 images. A few hundred bytes of memo references
# can otherwise describe a list of 2^30 labels.
MAX_PICKLE_ELEMENTS = 1_000_000

# What unpickling the official files (and our synthetic ones) needs: NumPy's array
# reconstruction under its NumPy 1 and NumPy 2 module names, and bytes re-encoding of
# protocol-2 pickles written by Python 3. Nothing here can run code or touch files, and no
# array can be larger than its bytes in the file: ``_reconstruct`` is given a size check, and
# ``numpy.ndarray`` is only a marker for it, never called (``ndarray((10**5, 3072), 'u1')``
# would allocate a gigabyte from a 200-byte pickle).
class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` in a pickle: an argument of ``_reconstruct``, not a callable."""

    def __call__(self, *args, **kwargs):
        raise ValueError("the pickle calls numpy.ndarray directly, which an official batch never does")


_NDARRAY = _NdarrayMarker()


def _bounded_reconstruct(subtype, shape, dtype):
    """NumPy's ``_reconstruct`` for the official ``_reconstruct(ndarray, (0,), b'b')`` call, refusing
    any shape whose allocation would exceed MAX_BATCH_BYTES (the data itself comes later, in BUILD,
    and NumPy checks it against the shape)."""
    if subtype is not _NDARRAY:
        raise ValueError(f"_reconstruct of {subtype!r}; an official batch only reconstructs numpy.ndarray")
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    nbytes = np.dtype(dtype).itemsize
    for d in dims:
        nbytes *= int(d)
    if nbytes > MAX_BATCH_BYTES:
        raise ValueError(f"an array of shape {dims} ({nbytes} bytes) is larger than "
                         f"MAX_BATCH_BYTES={MAX_BATCH_BYTES}")
    return np._core.multiarray._reconstruct(np.ndarray, dims, dtype)


def _plain_dtype(*args):
    """``numpy.dtype`` without Python objects: an object dtype would make NumPy build the array
    from a pickled list of objects (and NumPy's own ``__setstate__`` can crash on a crafted one)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects; an official batch holds only numbers and bytes")
    return dtype


_SAFE_GLOBALS = {
    (module, name): target
    for core in ("numpy.core", "numpy._core")
    for module, name, target in (
        (f"{core}.multiarray", "_reconstruct", _bounded_reconstruct),
        (f"{core}.multiarray", "scalar", np._core.multiarray.scalar),
        (f"{core}.numeric", "_frombuffer", np._core.numeric._frombuffer),
    )
} | {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _plain_dtype,
     ("_codecs", "encode"): __import__("codecs").encode}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, blob: bytes, where: str):
        super().__init__(io.BytesIO(blob), encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles name Python 2 modules (__builtin__.eval, commands.Popen): report and
        # match the Python 3 names, as pickle's own find_class would resolve them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.where}: refused to unpickle: it names the global {module}.{name}, which a "
                            "CIFAR-10 batch never needs (only NumPy arrays, lists, bytes and numbers). The file "
                            "is not an official batch and may be malicious: get the dataset from "
                            f"{CIFAR10_URL} (md5 {CIFAR10_MD5})") from None

    def persistent_load(self, pid):
        raise DataError(f"{self.where}: refused to unpickle a persistent reference; not a CIFAR-10 batch")


def unpickle(blob: bytes, where: str):
    """A CIFAR batch or ``batches.meta`` from its bytes, through the restricted unpickler; the
    result holds at most MAX_PICKLE_ELEMENTS elements, however often they are shared."""
    try:
        obj = _SafeUnpickler(blob, where).load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pickle raises many types on garbage
        raise DataError(f"{where}: not a readable CIFAR-10 python batch ({type(e).__name__}: {str(e)[:200]})") \
            from None
    if not within_size(obj, MAX_PICKLE_ELEMENTS):
        raise DataError(f"{where}: expands to more than MAX_PICKLE_ELEMENTS={MAX_PICKLE_ELEMENTS} elements "
                        "(nested or shared lists; an official batch holds ~20,000); not a CIFAR-10 batch")
    return obj


def _locate(root: Path) -> tuple[bool, Path]:
    """``(True, tarball)`` or ``(False, directory holding the batch files)`` for a data root."""
    if root.is_file():
        return True, root
    base = root / CIFAR10_DIR if (root / CIFAR10_DIR).is_dir() else root
    if not (base / "batches.meta").exists() and (root / CIFAR10_TARBALL).is_file():
        return True, root / CIFAR10_TARBALL
    return False, base


def cifar_inputs(root: Path) -> list[Path]:
    """The files the reader will read for ``root`` (what the store's fingerprint covers)."""
    is_tarball, path = _locate(root)
    return [path] if is_tarball else [path / name for name in CIFAR10_FILES if (path / name).exists()]


def read_cifar_python(root: Path) -> tuple[list[str], dict]:
    """Read the official python-batch layout from a directory or a ``.tar.gz``; validate it all."""
    is_tarball, path = _locate(root)
    if is_tarball:
        members, where = _read_tarball(path), lambda name: f"{path}:{CIFAR10_DIR}/{name}"
    else:
        members, where = _read_directory(path), lambda name: str(path / name)

    required = (*CIFAR10_TRAIN_BATCHES, "test_batch")
    missing = [n for n in required if n not in members]
    if missing:
        raise DataError(f"missing CIFAR-10 batch file(s) {', '.join(where(n) for n in missing)}: "
                        f"expected {', '.join(required)} (the official python version)")
    classes = list(CIFAR10_CLASSES)
    if "batches.meta" in members:
        meta = unpickle(members["batches.meta"], where("batches.meta"))
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
            raise DataError(f"{where('batches.meta')}: no b'label_names' list of names")
        classes = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]
        repeated = sorted(c for c, n in collections.Counter(classes).items() if n > 1)
        if repeated:
            raise DataError(f"{where('batches.meta')}: class name(s) {shown(repeated)} appear more than once in "
                            "b'label_names'; every class needs its own name")

    def batch(names: tuple[str, ...]) -> dict:
        parts = [_read_batch(members[n], where(n), len(classes)) for n in names]
        return {"images": np.concatenate([p[0] for p in parts]),
                "labels": np.concatenate([p[1] for p in parts])}

    return classes, {"train": batch(CIFAR10_TRAIN_BATCHES), "test": batch(("test_batch",))}


def _read_directory(base: Path) -> dict[str, bytes]:
    members = {}
    for name in CIFAR10_FILES:
        path = base / name
        if not path.exists():
            continue
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path}: not a regular file; a CIFAR-10 batch must be a plain file")
        if info.st_size > MAX_BATCH_BYTES:
            raise DataError(f"{path}: {info.st_size} bytes, more than MAX_BATCH_BYTES={MAX_BATCH_BYTES} "
                            "(an official batch is ~31 MB); not a CIFAR-10 batch")
        with open(path, "rb") as f:
            members[name] = f.read(MAX_BATCH_BYTES + 1)  # bounded even if the file grows meanwhile
        if len(members[name]) > MAX_BATCH_BYTES:
            raise DataError(f"{path}: grew past MAX_BATCH_BYTES={MAX_BATCH_BYTES} while being read; not a "
                            "CIFAR-10 batch")
    return members


class _BoundedReads:
    """The decompressed tar stream, refusing any single read over ``limit`` bytes and any position
    past MAX_TARBALL_BYTES. ``tarfile`` reads a GNU long-name or pax header whole, while moving to
    the next member and before our loop sees its size: this bounds those reads too."""

    def __init__(self, fileobj, where: Path):
        self.fileobj, self.where, self.limit = fileobj, where, MAX_TAR_HEADER_BYTES

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.limit:
            raise DataError(f"{self.where}: a tar header or member asks to read {size} bytes at once, more than "
                            f"{self.limit}; not a CIFAR-10 tarball")
        if self.fileobj.tell() + size > MAX_TARBALL_BYTES:
            raise DataError(f"{self.where}: more than MAX_TARBALL_BYTES={MAX_TARBALL_BYTES} bytes uncompressed "
                            "(the official tarball holds ~178 MB); not a CIFAR-10 tarball")
        return self.fileobj.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0 and offset > MAX_TARBALL_BYTES:
            raise DataError(f"{self.where}: members reach past {offset} bytes, more than MAX_TARBALL_BYTES="
                            f"{MAX_TARBALL_BYTES} bytes uncompressed; not a CIFAR-10 tarball")
        return self.fileobj.seek(offset, whence)

    def tell(self) -> int:
        return self.fileobj.tell()


def _read_tarball(path: Path) -> dict[str, bytes]:
    members, total = {}, 0
    try:
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=(stream := _BoundedReads(gz, path)), mode="r:") as tar:
            for count, m in enumerate(tar, start=1):
                where = f"{path}:{m.name}"
                if count > MAX_TARBALL_MEMBERS:
                    raise DataError(f"{path}: more than MAX_TARBALL_MEMBERS={MAX_TARBALL_MEMBERS} members "
                                    "(the official tarball has 8); not a CIFAR-10 tarball")
                total += m.size
                if total > MAX_TARBALL_BYTES:
                    raise DataError(f"{path}: members add up to more than MAX_TARBALL_BYTES={MAX_TARBALL_BYTES} "
                                    "bytes uncompressed (the official ones, ~178 MB); refused before reading")
                name = Path(m.name)
                if name.parent.name != CIFAR10_DIR or name.name not in CIFAR10_FILES:
                    continue
                if not m.isreg():
                    kind = ("a symlink" if m.issym() else "a hard link" if m.islnk() else
                            "a device" if m.isdev() else "a directory" if m.isdir() else "not a regular file")
                    raise DataError(f"{where}: is {kind}; the official tarball holds only regular files")
                if m.size > MAX_BATCH_BYTES:
                    raise DataError(f"{where}: {m.size} bytes, more than MAX_BATCH_BYTES={MAX_BATCH_BYTES} "
                                    "(an official batch is ~31 MB); refused before reading")
                stream.limit = m.size
                try:
                    members[name.name] = tar.extractfile(m).read()
                finally:
                    stream.limit = MAX_TAR_HEADER_BYTES
    except PermissionError:  # not corrupt: named as such by the caller (job/data/store.py)
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated tarball ({e}); download it again "
                        f"({CIFAR10_URL}, md5 {CIFAR10_MD5})") from None
    return members


def _read_batch(blob: bytes, where: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = unpickle(blob, where)
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{where}: expected a dict with b'data' and b'labels'")
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{where}: b'data' has shape {shape} and dtype {dtype}; "
                        "expected (N, 3072) uint8 (32x32 RGB, channel-major)")
    try:
        labels = np.asarray(d[b"labels"])
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where}: b'labels' is not a list of integers") from None
    # Integers only: casting would truncate 0.7 to class 0 (and True to class 1) without a word.
    if labels.size and labels.dtype.kind not in "iu":
        raise DataError(f"{where}: b'labels' holds {labels.dtype} values (e.g. {shown(labels.ravel()[:3].tolist())}); "
                        "class labels must be integers")
    labels = labels.astype(np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {labels.size} labels for {len(data)} images")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {int(bad[0])} out of range [0, {num_classes})")
    # Channel-major rows -> HWC, the layout DALI's image operators expect.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


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
                _copy_bounded(response, f, MAX_DOWNLOAD_BYTES - (offset if resumed else 0), url)
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


def _copy_bounded(src, dst, limit: int, url: str) -> None:
    copied = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        copied += len(chunk)
        if copied > limit:
            dst.close()
            os.unlink(dst.name)
            raise DataError(f"{url} sent more than MAX_DOWNLOAD_BYTES={MAX_DOWNLOAD_BYTES} bytes (the official "
                            "tarball is 163 MB); the download was deleted. Check CIFAR10_URL")
        dst.write(chunk)


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def dump_batch(path: Path, obj) -> None:
    """Write a batch in the official format (used by the synthetic source and the tests)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)

