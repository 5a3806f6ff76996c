"""Hostile inputs, built inside each test: refused with exit code 2 and the file named, never run,
never read unbounded, never written outside the output directory, a good store left untouched."""
from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from helpers.runs import CIFAR_MINI, FOLDER_MINI, PYTHON, assert_refused, prepare_cli, run, snapshot
from job.data import DataError, cifar10, folder, prepare


@pytest.fixture
def good_store(tmp_path):
    """A good store at tmp_path/store that every refused input must leave byte-identical."""
    prepare("cifar10", CIFAR_MINI, tmp_path / "store")
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


# ---------------------------------------------------------------- bounded reads

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
    # Run it in a child that reports its own peak memory: reading the member would need > 256 MB.
    # (VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the pytest parent.)
    code = ("import re, sys; from job.data.__main__ import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('maxrss_kb', hwm, file=sys.stderr); sys.exit(rc)")
    proc = run([PYTHON, "-c", code, "prepare", "--source", "cifar10", "--root", str(bomb),
                "--out", str(tmp_path / "store")], check=False)
    assert_refused(proc, f"{bomb}:cifar-10-batches-py/data_batch_1", "MAX_BATCH_BYTES", "refused before reading")
    peak_mb = int(proc.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    assert peak_mb < 200, peak_mb
    assert_untouched(tmp_path, good_store, {"bomb.tar.gz"})


def test_total_size_and_member_count_are_capped(tmp_path, monkeypatch):
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as tar:
        for i in range(50):
            _add(tar, f"junk/{i}", b"x" * 1000)
    monkeypatch.setattr(cifar10, "MAX_TARBALL_MEMBERS", 20)
    with pytest.raises(DataError, match=f"{many}: more than MAX_TARBALL_MEMBERS=20 members"):
        prepare("cifar10", many, tmp_path / "a")
    monkeypatch.setattr(cifar10, "MAX_TARBALL_MEMBERS", 1000)
    monkeypatch.setattr(cifar10, "MAX_TARBALL_BYTES", 10_000)
    with pytest.raises(DataError, match="more than MAX_TARBALL_BYTES=10000 bytes uncompressed"):
        prepare("cifar10", many, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


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
def test_a_decompression_bomb_header_is_refused(tmp_path, pixels):
    root = _small_folder(tmp_path)
    bomb = root / "train" / "cat" / "bomb.png"
    bomb.write_bytes(_png_header_only(*pixels))
    proc = prepare_cli(root, tmp_path / "store", "folder")
    assert_refused(proc, str(bomb))
    assert "MAX_IMAGE_PIXELS" in proc.stderr or "decompression bomb" in proc.stderr
    assert not (tmp_path / "store").exists()


def test_a_fifo_in_a_class_folder_is_refused_without_hanging(tmp_path):
    root = _small_folder(tmp_path)
    fifo = root / "test" / "ship" / "pipe.jpg"
    os.mkfifo(fifo)
    proc = prepare_cli(root, tmp_path / "store", "folder")  # run() times out if it hangs
    assert_refused(proc, str(fifo), "a FIFO, not an image file")
    assert not (tmp_path / "store").exists()


def test_too_many_files_are_refused(tmp_path, monkeypatch):
    root = _small_folder(tmp_path)
    monkeypatch.setattr(folder, "MAX_FOLDER_IMAGES", 30)
    with pytest.raises(DataError, match="more than MAX_FOLDER_IMAGES=30 files"):
        prepare("folder", root, tmp_path / "store")


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
    store, _ = prepare("folder", root, tmp_path / "store")
    assert weird in store.classes
    assert {p.name for p in tmp_path.iterdir()} == {"imgs", "store"}
