"""Hostile inputs, built inside each test: refused with exit code 2 and the file named, never run,
never read unbounded, never written outside the output directory, a good store left untouched."""
from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from job.config import DataConfig
from helpers.runs import CIFAR_MINI, FOLDER_MINI, PYTHON, assert_refused, prepare_cli, run, snapshot
from job.data import DataError, cifar10, folder, prepare


@pytest.fixture
def good_store(tmp_path):
    """A good store at tmp_path/store that every refused input must leave byte-identical."""
    prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI)), tmp_path / "store")
    return tmp_path / "store", snapshot(tmp_path / "store")


def assert_untouched(tmp_path: Path, good_store, extra_entries: set[str]) -> None:
    out, before = good_store
    assert snapshot(out) == before
    # nothing written beside the store but the hostile input itself (no temp dirs, no extraction)
    assert {p.name for p in tmp_path.iterdir()} == {"store", *extra_entries}


# ---------------------------------------------------------------- pickles that would run code

class _Exploit:
    """Unpickling this would call ``func(*args)``: the marker file would appear."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_batch(marker: Path, kind: str) -> bytes:
    import builtins
    import subprocess

    payload = {"posix.system": _Exploit(os.system, f"touch {marker}"),
               "builtins.eval": _Exploit(builtins.eval, f"open({str(marker)!r}, 'w')"),
               "subprocess.Popen": _Exploit(subprocess.Popen, ["touch", str(marker)])}[kind]
    return pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)


def _batch_dir(tmp_path: Path) -> Path:
    root = tmp_path / "hostile" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for f in CIFAR_MINI.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    return root


@pytest.mark.parametrize("kind", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_a_batch_that_would_run_code_is_refused_through_the_cli(tmp_path, good_store, kind):
    marker = tmp_path / "hostile" / "PWNED"
    root = _batch_dir(tmp_path)
    (root / "data_batch_2").write_bytes(_hostile_batch(marker, kind))
    proc = prepare_cli(root.parent, tmp_path / "store")
    module, name = kind.rsplit(".", 1)
    assert_refused(proc, str(root / "data_batch_2"), f"{module}.{name}", "refused to unpickle")
    assert not marker.exists()
    assert_untouched(tmp_path, good_store, {"hostile"})


def test_a_hostile_batches_meta_in_a_tarball_is_refused(tmp_path, good_store):
    marker = tmp_path / "PWNED"
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for f in sorted(CIFAR_MINI.iterdir()):
            blob = f.read_bytes() if f.name != "batches.meta" else pickle.dumps(
                {b"label_names": _Exploit(os.system, f"touch {marker}")}, protocol=2)
            _add(tar, f"cifar-10-batches-py/{f.name}", blob)
    proc = prepare_cli(tarball, tmp_path / "store")
    assert_refused(proc, f"{tarball}:cifar-10-batches-py/batches.meta", "posix.system")
    assert not marker.exists()
    assert_untouched(tmp_path, good_store, {"evil.tar.gz"})


def test_the_restricted_unpickler_reads_what_numpy_writes():
    """NumPy 1 and 2 module names and pickle protocols 2-5 all load (what real batch files hold)."""
    import numpy as np

    array = np.arange(3072, dtype=np.uint8).reshape(1, 3072)
    for protocol in (2, 3, 4, 5):
        back = cifar10.unpickle(pickle.dumps({b"data": array, b"labels": [np.int64(3)]}, protocol=protocol), "x")
        assert np.array_equal(back[b"data"], array) and back[b"labels"] == [3]
    legacy = pickle.dumps(array, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(cifar10.unpickle(legacy, "x"), array)


@pytest.mark.parametrize("call", ["ndarray", "_reconstruct"])
def test_a_tiny_pickle_cannot_allocate_a_huge_array(tmp_path, good_store, call):
    """A 200-byte batch asking NumPy for a 30 GB array: refused before anything is allocated."""
    import numpy as np

    shape = (10_000_000, 3072)
    payload = (_Exploit(np.ndarray, shape, np.dtype(np.uint8)) if call == "ndarray" else
               _Exploit(np._core.multiarray._reconstruct, np.ndarray, shape, b"B"))
    root = _batch_dir(tmp_path)
    blob = pickle.dumps({b"data": payload, b"labels": [0] * 10}, protocol=2)
    assert len(blob) < 400
    (root / "data_batch_3").write_bytes(blob)
    proc = prepare_cli_measured(root.parent, tmp_path / "store")
    assert_refused(proc, str(root / "data_batch_3"))
    assert ("calls numpy.ndarray directly" if call == "ndarray" else "larger than MAX_BATCH_BYTES") in proc.stderr
    assert peak_mb(proc) < 400
    assert_untouched(tmp_path, good_store, {"hostile"})


def test_an_object_dtype_is_refused_before_numpy_builds_the_array(tmp_path, good_store):
    """An object array is rebuilt from a pickled list, which NumPy's __setstate__ trusts (a
    crafted state can crash the interpreter): no dtype holding Python objects is created."""
    import numpy as np

    root = _batch_dir(tmp_path)
    objects = np.array([0] * 3072, dtype=object).reshape(1, 3072)
    (root / "data_batch_5").write_bytes(pickle.dumps({b"data": objects, b"labels": [0]}, protocol=2))
    proc = prepare_cli(root.parent, tmp_path / "store")
    assert_refused(proc, str(root / "data_batch_5"), "holds Python objects")
    assert_untouched(tmp_path, good_store, {"hostile"})


# ---------------------------------------------------------------- bounded reads

def prepare_cli_measured(root: Path, out: Path, **limits: int) -> subprocess.CompletedProcess:
    """``python -m job.data prepare`` in a child that sets the module's caps to ``limits`` (so a test
    reaches them with small files) and reports its own peak memory on stderr. (VmHWM, not
    ru_maxrss: Linux carries ru_maxrss across exec from the pytest parent.)"""
    code = ("import re, sys; from job.data import cifar10, folder; "
            f"[setattr(m, k, v) for k, v in {limits!r}.items() for m in (cifar10, folder) if hasattr(m, k)]; "
            "from job.data.__main__ import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('maxrss_kb', hwm, file=sys.stderr); sys.exit(rc)")
    source = "folder" if (Path(root) / "train").is_dir() else "cifar10"
    return run([PYTHON, "-c", code, "prepare", "--source", source, "--root", str(root), "--out", str(out)],
               check=False)


def peak_mb(proc: subprocess.CompletedProcess) -> float:
    return int(proc.stderr.split("maxrss_kb")[1].split()[0]) / 1024


def _add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


class _Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_a_gzip_bomb_member_is_refused_before_it_is_read(tmp_path, good_store):
    """300 MB of zeros, 0.3 MB compressed, named like a batch: refused from its header alone."""
    bomb = tmp_path / "bomb.tar.gz"
    size = cifar10.MAX_BATCH_BYTES + 2**20
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = size
        tar.addfile(info, _Zeros(size))
    assert bomb.stat().st_size < 2 * 2**20
    proc = prepare_cli_measured(bomb, tmp_path / "store")
    assert_refused(proc, f"{bomb}:cifar-10-batches-py/data_batch_1", "MAX_BATCH_BYTES", "refused before reading")
    assert peak_mb(proc) < 200  # reading the member would need > 256 MB
    assert_untouched(tmp_path, good_store, {"bomb.tar.gz"})


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_a_huge_long_name_header_is_refused_before_it_is_read(tmp_path, good_store, tar_format):
    """``tarfile`` reads a GNU long-name or pax header whole while looking for the next member:
    a 64 MB name (64 KB compressed) must be refused before it is read into memory."""
    bomb = tmp_path / "names.tar.gz"
    with tarfile.open(bomb, "w:gz", compresslevel=1, format=tar_format) as tar:
        _add(tar, "cifar-10-batches-py/" + "n" * 64 * 2**20, b"x")
    assert bomb.stat().st_size < 2**20
    proc = prepare_cli_measured(bomb, tmp_path / "store")
    assert_refused(proc, str(bomb), "not a CIFAR-10 tarball")
    assert peak_mb(proc) < 150, peak_mb(proc)
    assert_untouched(tmp_path, good_store, {"names.tar.gz"})


def test_total_size_and_member_count_are_capped(tmp_path, good_store):
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as tar:
        for i in range(50):
            _add(tar, f"junk/{i}", b"x" * 1000)
    proc = prepare_cli_measured(many, tmp_path / "store", MAX_TARBALL_MEMBERS=20)
    assert_refused(proc, f"{many}: more than MAX_TARBALL_MEMBERS=20 members")
    proc = prepare_cli_measured(many, tmp_path / "store", MAX_TARBALL_BYTES=10_000)
    assert_refused(proc, f"{many}: ", "more than MAX_TARBALL_BYTES=10000 bytes uncompressed")
    assert_untouched(tmp_path, good_store, {"many.tar.gz"})


@pytest.mark.parametrize("kind", ["oversized", "fifo"])
def test_a_batch_directory_reads_only_plain_files_of_a_sane_size(tmp_path, good_store, kind):
    root = _batch_dir(tmp_path)
    batch = root / "data_batch_4"
    batch.unlink()
    if kind == "fifo":
        os.mkfifo(batch)
    else:  # sparse: costs no disk, but its size says 257 MB
        with open(batch, "wb") as f:
            f.truncate(cifar10.MAX_BATCH_BYTES + 1)
    proc = prepare_cli(root.parent, tmp_path / "store")
    assert_refused(proc, str(batch), "MAX_BATCH_BYTES" if kind == "oversized" else "not a regular file")
    assert_untouched(tmp_path, good_store, {"hostile"})


@pytest.mark.parametrize("kind", ["symlink", "hard link", "device"])
def test_link_and_device_members_are_refused(tmp_path, good_store, kind):
    tarball = tmp_path / "links.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for f in sorted(CIFAR_MINI.iterdir()):
            if f.name == "test_batch":
                info = tarfile.TarInfo(f"cifar-10-batches-py/{f.name}")
                info.type = {"symlink": tarfile.SYMTYPE, "hard link": tarfile.LNKTYPE, "device": tarfile.CHRTYPE}[kind]
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                _add(tar, f"cifar-10-batches-py/{f.name}", f.read_bytes())
    proc = prepare_cli(tarball, tmp_path / "store")
    assert_refused(proc, f"{tarball}:cifar-10-batches-py/test_batch", f"is a {kind}")
    assert_untouched(tmp_path, good_store, {"links.tar.gz"})


# ---------------------------------------------------------------- image folders

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the (tiny) pixel data is never valid."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def _small_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("cat", "ship"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((FOLDER_MINI / split / cls).iterdir())[:12]:
                (root / split / cls / src.name).write_bytes(src.read_bytes())
    return root


@pytest.mark.parametrize("pixels", [(8000, 8000), (100_000, 100_000)])
def test_a_decompression_bomb_header_is_refused(tmp_path, good_store, pixels):
    root = _small_folder(tmp_path)
    bomb = root / "train" / "cat" / "bomb.png"
    bomb.write_bytes(_png_header_only(*pixels))
    proc = prepare_cli_measured(root, tmp_path / "store")
    assert_refused(proc, str(bomb))
    assert "MAX_IMAGE_PIXELS" in proc.stderr or "decompression bomb" in proc.stderr
    assert peak_mb(proc) < 400  # 100,000^2 RGB pixels would be 30 GB
    assert_untouched(tmp_path, good_store, {"imgs"})


def test_a_fifo_in_a_class_folder_is_refused_without_hanging(tmp_path, good_store):
    root = _small_folder(tmp_path)
    fifo = root / "test" / "ship" / "pipe.jpg"
    os.mkfifo(fifo)
    proc = prepare_cli(root, tmp_path / "store", "folder")  # run() times out if it hangs
    assert_refused(proc, str(fifo), "a FIFO, not an image file")
    assert_untouched(tmp_path, good_store, {"imgs"})


def test_too_many_files_or_classes_are_refused_while_listing(tmp_path, good_store):
    root = _small_folder(tmp_path)
    proc = prepare_cli_measured(root, tmp_path / "store", MAX_FOLDER_IMAGES=30)
    assert_refused(proc, f"{root} holds more than MAX_FOLDER_IMAGES=30 files", "is data.root the dataset's folder")
    for i in range(5):
        (root / "train" / f"class{i}").mkdir()
    proc = prepare_cli_measured(root, tmp_path / "store", MAX_CLASSES=4)
    assert_refused(proc, f"{root / 'train'}: more than MAX_CLASSES=4 class folders")
    assert_untouched(tmp_path, good_store, {"imgs"})


def test_listing_stops_at_the_cap_instead_of_reading_the_whole_folder(tmp_path, monkeypatch):
    """The cap is counted while the directory is read: a folder of a million names is not listed."""
    seen = []

    class Entries:
        def __init__(self, path):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            for i in range(1_000_000):
                seen.append(i)
                yield type("Entry", (), {"name": f"{i}.jpg", "path": str(tmp_path / f"{i}.jpg")})()

    monkeypatch.setattr(folder.os, "scandir", Entries)
    with pytest.raises(DataError, match="more than 30"):
        folder._listed(tmp_path, 30, "more than 30")
    assert len(seen) == 31


def test_symlinks_out_of_the_root_are_refused_unless_allowed(tmp_path):
    root = _small_folder(tmp_path)
    outside = tmp_path / "elsewhere" / "ship"
    outside.mkdir(parents=True)
    for src in sorted((FOLDER_MINI / "train" / "ship").iterdir())[:5]:
        (outside / src.name).write_bytes(src.read_bytes())
    (root / "train" / "ship").rename(tmp_path / "moved")
    (root / "train" / "ship").symlink_to(outside)
    proc = prepare_cli(root, tmp_path / "store", "folder")
    assert_refused(proc, str(root / "train" / "ship"), "outside the data root", "--follow-symlinks")
    proc = prepare_cli(root, tmp_path / "store", "folder", "--follow-symlinks")
    assert proc.returncode == 0, proc.stderr
    # A file symlink out of the root is refused the same way.
    (root / "train" / "ship").unlink()
    (tmp_path / "moved").rename(root / "train" / "ship")
    (root / "test" / "cat" / "escape.jpg").symlink_to(next(outside.iterdir()))
    proc = prepare_cli(root, tmp_path / "store2", "folder")
    assert_refused(proc, "escape.jpg", "outside the data root")


def test_class_names_are_labels_never_paths(tmp_path):
    """A class folder named like shell code or a path is just a label; nothing is written outside --out."""
    root = _small_folder(tmp_path)
    weird = "$(touch PWNED) ..%2F..%2Fetc"
    for split in ("train", "test"):
        (root / split / "cat").rename(root / split / weird)
    store, _ = prepare(DataConfig(source="folder", root=str(root)), tmp_path / "store")
    assert weird in store.classes
    assert {p.name for p in tmp_path.iterdir()} == {"imgs", "store"}


# ---------------------------------------------------------------- what a batch's values may be

def test_a_memo_reference_bomb_is_refused_in_bounded_time_and_memory(tmp_path, good_store):
    """~300 bytes of pickle whose labels are a nested list with 2^30 leaves (each level references
    the one below twice): refused by counting what the object expands to, not by its bytes."""
    import numpy as np

    labels: list = [0]
    for _ in range(30):
        labels = [labels, labels]
    blob = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": labels}, protocol=4)
    assert len(blob) < 3500
    root = _batch_dir(tmp_path)
    (root / "data_batch_4").write_bytes(blob)
    proc = prepare_cli_measured(root.parent, tmp_path / "store")
    assert_refused(proc, str(root / "data_batch_4"), "MAX_PICKLE_ELEMENTS")
    assert peak_mb(proc) < 400
    assert_untouched(tmp_path, good_store, {"hostile"})


@pytest.mark.parametrize("labels, needle", [([0.7, 1.7], "float64"), ([True, False], "bool")])
def test_labels_must_be_integers(tmp_path, good_store, labels, needle):
    """Floats were truncated to classes (0.7 -> 0) without a word; bools would be 0 and 1."""
    import numpy as np

    root = _batch_dir(tmp_path)
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}))
    proc = prepare_cli(root.parent, tmp_path / "store")
    assert_refused(proc, str(root / "data_batch_1"), needle, "class labels must be integers")
    assert_untouched(tmp_path, good_store, {"hostile"})


def test_class_names_must_be_unique(tmp_path, good_store):
    root = _batch_dir(tmp_path)
    names = [b"cat", b"dog", b"cat", b"cat", *[f"c{i}".encode() for i in range(6)]]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    proc = prepare_cli(root.parent, tmp_path / "store")
    assert_refused(proc, str(root / "batches.meta"), "'cat'", "more than once")
    assert_untouched(tmp_path, good_store, {"hostile"})
