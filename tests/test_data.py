"""Data preparation on the real CIFAR-10 samples, the download path, and every bad input."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from job.config import DataConfig
from helpers.runs import CIFAR_MINI, FOLDER_MINI, PYTHON, run
from job import data
from job.data import DataError, cifar10, prepare


def _official_arrays(name: str):
    d = cifar10.unpickle((CIFAR_MINI / name).read_bytes(), name)
    return np.asarray(d[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[b"labels"])


def _make_tarball(path: Path, src: Path = CIFAR_MINI, drop: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(src.iterdir()):
            if f.name != drop:
                tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
    return path


# ---------------------------------------------------------------- the three sources

def test_cifar10_directory_store_matches_the_official_arrays(tmp_path):
    store, reused = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI), val_fraction=0.1, split_seed=0),
                            tmp_path / "s")
    assert not reused
    assert store.counts == {"train": 1800, "val": 200, "test": 1000}
    assert store.classes == list(data.CIFAR10_CLASSES)
    test_x, test_y = _official_arrays("test_batch")
    split = store.split("test")
    assert np.array_equal(split.images, test_x) and np.array_equal(split.labels, test_y)
    # train + val is exactly the official train set, and val is stratified: 20 per class.
    train_x = np.concatenate([_official_arrays(f"data_batch_{i}")[0] for i in range(1, 6)])
    got = np.concatenate([store.split("train").images, store.split("val").images])
    assert sorted(map(bytes, got)) == sorted(map(bytes, train_x))
    assert np.bincount(store.split("val").labels).tolist() == [20] * 10


def test_tarball_gives_the_same_store_and_reuse_and_rebuild(tmp_path):
    tarball = _make_tarball(tmp_path / "cifar-10-python.tar.gz")
    a, _ = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI)), tmp_path / "dir")
    b, reused = prepare(DataConfig(source="cifar10", root=str(tarball)), tmp_path / "tar")
    assert not reused
    for split in ("train", "val", "test"):
        assert np.array_equal(a.split(split).images, b.split(split).images)
        assert np.array_equal(a.split(split).labels, b.split(split).labels)
    mtime = (tmp_path / "tar" / "meta.json").stat().st_mtime_ns
    _, reused = prepare(DataConfig(source="cifar10", root=str(tarball)), tmp_path / "tar")
    assert reused and (tmp_path / "tar" / "meta.json").stat().st_mtime_ns == mtime
    c, reused = prepare(DataConfig(source="cifar10", root=str(tarball), val_fraction=0.2),
                        tmp_path / "tar")  # inputs changed: rebuild
    assert not reused and c.counts["val"] == 400


def test_folder_source_on_real_jpegs(folder_store):
    assert folder_store.format == "encoded"
    assert folder_store.classes == sorted(p.name for p in (FOLDER_MINI / "train").iterdir())
    assert folder_store.counts == {"train": 900, "val": 100, "test": 500}
    test = folder_store.split("test")
    assert all(Path(f).is_file() for f in test.files)
    assert [folder_store.classes[label] for label in test.labels] == [Path(f).parent.name for f in test.files]


def test_explicit_val_folder_wins(tmp_path):
    root = tmp_path / "imgs"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20 + i, 17), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    store, _ = prepare(DataConfig(source="folder", root=str(root), val_fraction=0.5), tmp_path / "s")
    assert store.counts == {"train": 6, "val": 4, "test": 2}


def test_synthetic_is_seeded_and_learnable_shaped(tmp_path):
    a, _ = prepare(DataConfig(source="synthetic", root=str(tmp_path / "src_a"), synthetic_train=500,
                              synthetic_test=100, split_seed=1), tmp_path / "a")
    b, _ = prepare(DataConfig(source="synthetic", root=str(tmp_path / "src_b"), synthetic_train=500,
                              synthetic_test=100, split_seed=1), tmp_path / "b")
    c, _ = prepare(DataConfig(source="synthetic", root=str(tmp_path / "src_c"), synthetic_train=500,
                              synthetic_test=100, split_seed=2), tmp_path / "c")
    assert a.counts == {"train": 450, "val": 50, "test": 100}
    assert np.array_equal(a.split("train").images, b.split("train").images)
    assert not np.array_equal(a.split("train").images, c.split("train").images)
    # Class signal: the mean image of each class differs from the others by far more than noise.
    x, y = a.split("train").images.astype(np.float32), a.split("train").labels
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    assert np.abs(means[0] - means[5]).mean() > 5
    assert (tmp_path / "src_a" / "cifar-10-batches-py" / "data_batch_5").is_file()  # official layout


def test_cli_prints_counts_and_classes(tmp_path):
    out = run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--root", str(CIFAR_MINI),
               "--out", str(tmp_path / "s"), "--val-fraction", "0.25"])
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["counts"] == {"train": 1500, "val": 500, "test": 1000}
    assert line["classes"][0] == "airplane" and len(line["classes"]) == 10


# ---------------------------------------------------------------- download

class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (enough for a resumed download)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        blob = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        else:
            self.send_response(200)
        self.server.requests.append(self.headers.get("Range"))
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        self.wfile.write(blob[start:])


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()


def test_download_verifies_md5_and_resumes(tmp_path, http_server):
    served, url, server = http_server
    tarball = _make_tarball(served / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    dest = tmp_path / "dl"
    dest.mkdir()
    # A previous attempt died halfway: the .part file is resumed with a Range request.
    half = tarball.read_bytes()[: tarball.stat().st_size // 2]
    (dest / "cifar-10-python.tar.gz.part").write_bytes(half)
    got = data.download_cifar10(dest, url=f"{url}/cifar-10-python.tar.gz", md5=md5)
    assert server.requests == [f"bytes={len(half)}-"]
    assert got.read_bytes() == tarball.read_bytes() and not (dest / "cifar-10-python.tar.gz.part").exists()
    # Already there and valid: nothing is fetched again.
    data.download_cifar10(dest, url=f"{url}/cifar-10-python.tar.gz", md5=md5)
    assert len(server.requests) == 1


def test_download_md5_mismatch_is_refused_and_cleaned(tmp_path, http_server):
    served, url, _ = http_server
    _make_tarball(served / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="md5 mismatch"):
        data.download_cifar10(tmp_path, url=f"{url}/cifar-10-python.tar.gz")  # the official md5
    assert not list(tmp_path.glob("cifar-10-python.tar.gz*"))


def test_download_through_the_cli_and_offline_error(tmp_path, http_server):
    served, url, _ = http_server
    tarball = _make_tarball(served / "cifar-10-python.tar.gz")
    os.environ["CIFAR10_URL"] = f"{url}/cifar-10-python.tar.gz"
    try:
        bad = run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--download", "--root",
                   str(tmp_path / "dl"), "--out", str(tmp_path / "s")], check=False)
        assert bad.returncode == 2 and "md5 mismatch" in bad.stderr  # a mini tarball is not the official file
    finally:
        del os.environ["CIFAR10_URL"]
    offline = run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--download", "--root",
                   str(tmp_path / "dl"), "--out", str(tmp_path / "s")],
                  env={"CIFAR10_URL": "http://127.0.0.1:9/cifar-10-python.tar.gz"}, check=False)
    assert offline.returncode == 2
    assert "could not download" in offline.stderr and "--root /path/to/cifar-10-python.tar.gz" in offline.stderr
    assert not (tmp_path / "s").exists()
    assert tarball.exists()


# ---------------------------------------------------------------- bad input

def _cifar_copy(tmp_path) -> Path:
    dst = tmp_path / "cifar-10-batches-py"
    shutil.copytree(CIFAR_MINI, dst)
    return dst


def _rewrite_batch(path: Path, changes: dict) -> None:
    d = cifar10.unpickle(path.read_bytes(), str(path))
    d.update(changes)
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _folder_copy(tmp_path) -> Path:
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            shutil.copytree(FOLDER_MINI / split / cls, root / split / cls)
    return root


def _bad_cifar(kind: str, tmp_path: Path) -> tuple[Path, str]:
    if kind == "truncated tarball":
        tarball = _make_tarball(tmp_path / "full.tar.gz")
        cut = tmp_path / "cifar-10-python.tar.gz"
        cut.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 3])
        return cut, "corrupt or truncated tarball"
    if kind == "corrupt tarball":
        bad = tmp_path / "cifar-10-python.tar.gz"
        bad.write_bytes(b"this is not gzip" * 100)
        return bad, "corrupt or truncated tarball"
    if kind == "missing batch in tarball":
        return _make_tarball(tmp_path / "c.tar.gz", drop="data_batch_3"), "data_batch_3"
    root = _cifar_copy(tmp_path)
    if kind == "missing batch":
        (root / "test_batch").unlink()
        return root, "missing CIFAR-10 batch file.*test_batch"
    if kind == "wrong shape":
        _rewrite_batch(root / "data_batch_2", {b"data": np.zeros((400, 1024), np.uint8)})
        return root, r"data_batch_2: b'data' has shape \(400, 1024\)"
    if kind == "labels out of range":
        _rewrite_batch(root / "data_batch_4", {b"labels": [10] * 400})
        return root, "data_batch_4: label 10 out of range"
    if kind == "label count":
        _rewrite_batch(root / "data_batch_1", {b"labels": [1] * 3})
        return root, "data_batch_1: 3 labels for 400 images"
    if kind == "garbage batch":
        (root / "data_batch_5").write_bytes(b"\x00garbage")
        return root, "data_batch_5: not a readable CIFAR-10 python batch"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated tarball", "corrupt tarball", "missing batch in tarball", "missing batch",
                                  "wrong shape", "labels out of range", "label count", "garbage batch"])
def test_bad_cifar_input_is_refused_and_the_good_store_survives(tmp_path, kind):
    good, _ = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI)), tmp_path / "store")
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    root, message = _bad_cifar(kind, tmp_path)
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(source="cifar10", root=str(root)), tmp_path / "store")
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".store")] == []  # no temp dirs left


def _bad_folder(kind: str, tmp_path: Path) -> tuple[Path, str]:
    root = _folder_copy(tmp_path)
    if kind == "empty class":
        (root / "train" / "dog").mkdir()
        return root, "train/dog: empty class folder"
    if kind == "stray file":
        (root / "train" / "cat" / "notes.txt").write_text("hi")
        return root, "notes.txt: not an image file"
    if kind == "stray file at class level":
        (root / "test" / "README").write_text("hi")
        return root, "README: stray file"
    if kind == "truncated image":
        victim = next((root / "test" / "cat").iterdir())
        victim.write_bytes(victim.read_bytes()[:300])
        return root, f"{victim.name}: unreadable or truncated image"
    if kind == "unreadable image":
        victim = next((root / "train" / "airplane").iterdir())
        victim.write_bytes(b"GIF89a not really")
        return root, f"{victim.name}: unreadable or truncated image"
    if kind == "one class":
        shutil.rmtree(root / "train" / "cat")
        shutil.rmtree(root / "test" / "cat")
        return root, "single class"
    if kind == "unknown test class":
        shutil.copytree(FOLDER_MINI / "test" / "dog", root / "test" / "dog")
        return root, "class 'dog' is not among the training classes"
    if kind == "missing test":
        shutil.rmtree(root / "test")
        return root, "missing test/ folder"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty class", "stray file", "stray file at class level", "truncated image",
                                  "unreadable image", "one class", "unknown test class", "missing test"])
def test_bad_folder_input_is_refused(tmp_path, kind):
    root, message = _bad_folder(kind, tmp_path)
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(source="folder", root=str(root)), tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_bad_input_via_cli_exits_nonzero_with_the_file_named(tmp_path):
    root, _ = _bad_cifar("labels out of range", tmp_path)
    proc = run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--root", str(root),
                "--out", str(tmp_path / "s")], check=False)
    assert proc.returncode == 2
    assert str(root / "data_batch_4") in proc.stderr and "out of range" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_only_a_store_this_job_marked_is_ours(tmp_path):
    """No path for stores from before the writer mark (never released): only meta.json's mark counts."""
    import json

    from job.data.store import WRITER, _read_meta

    (tmp_path / "meta.json").write_text(json.dumps({"version": 1, "format": "raw", "fingerprint": "f"}))
    assert _read_meta(tmp_path) is None
    (tmp_path / "meta.json").write_text(json.dumps({"writer": WRITER, "version": 2}))
    assert _read_meta(tmp_path) == {"writer": WRITER, "version": 2}
