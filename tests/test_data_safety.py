"""Never delete what the job did not write; refuse at prepare time what could not train.
Each case: exit code 2, a message naming the path and the fix, the user's files byte-identical."""
from __future__ import annotations

import os
import shutil
import socket
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from job.config import DataConfig
from helpers.runs import folder_subset, CIFAR_MINI, FOLDER_MINI, PYTHON, assert_refused, prepare_cli, run, snapshot
from job.atomic import TEMPORARY_MARKER
from job.data import prepare


def _cifar_root(tmp_path: Path) -> Path:
    root = tmp_path / "cifar"
    shutil.copytree(CIFAR_MINI, root / "cifar-10-batches-py")
    return root


def _folder_root(tmp_path: Path, per_class: int = 10, classes=("cat", "ship")) -> Path:
    return folder_subset(tmp_path, classes, per_class)


# ---------------------------------------------------------------- data loss

def test_out_pointing_at_a_folder_of_user_files_is_refused(tmp_path):
    mine = tmp_path / "my-photos"
    (mine / "2024").mkdir(parents=True)
    (mine / "2024" / "beach.txt").write_text("precious")
    (mine / "notes.md").write_text("also precious")
    before = snapshot(mine)
    proc = prepare_cli(_cifar_root(tmp_path), mine)
    assert_refused(proc, str(mine), "did not write", "choose an empty or new directory")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar", "my-photos"]  # no hidden .old/.tmp


@pytest.mark.parametrize("where", ["root", "root/train", "parent of root"])
def test_out_overlapping_the_data_root_is_refused(tmp_path, where):
    root = _folder_root(tmp_path)
    before = snapshot(root)
    out = {"root": root, "root/train": root / "train", "parent of root": tmp_path}[where]
    proc = prepare_cli(root, out, "folder")
    assert_refused(proc, "overlap", "outside data.root")
    assert snapshot(root) == before


def test_synthetic_never_replaces_a_directory_it_did_not_write(tmp_path):
    root = _cifar_root(tmp_path)  # real batches where the synthetic generator would write
    (root / "cifar-10-batches-py" / "my-notes.txt").write_text("mine")
    before = snapshot(root)
    proc = prepare_cli(root, tmp_path / "store", "synthetic", "--num-train", "100", "--num-test", "20")
    assert_refused(proc, str(root / "cifar-10-batches-py"), "did not write", "choose another data.root")
    assert snapshot(root) == before
    assert not (tmp_path / "store").exists()


def test_out_pointing_at_an_existing_file_is_refused(tmp_path):
    target = tmp_path / "thesis.pdf"
    target.write_bytes(b"%PDF precious")
    proc = prepare_cli(_cifar_root(tmp_path), target)
    assert_refused(proc, str(target), "not a directory")
    assert target.read_bytes() == b"%PDF precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar", "thesis.pdf"]


def test_a_store_this_job_wrote_is_replaced_and_an_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    a, reused = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI)), tmp_path / "empty")
    b, _ = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI), val_fraction=0.2),
                   tmp_path / "empty")  # rebuilt in place
    assert not reused and a.counts["val"] == 200 and b.counts["val"] == 400


# ---------------------------------------------------------------- silently wrong

def test_the_fingerprint_follows_symlinks(tmp_path):
    """A symlinked class folder re-pointed at other images rebuilds the store (it used to be reused)."""
    root = _folder_root(tmp_path)
    pool = root / "pool"
    for version in ("v1", "v2"):
        (pool / version).mkdir(parents=True)
    for i, src in enumerate(sorted((FOLDER_MINI / "train" / "dog").iterdir())[:12]):
        shutil.copy(src, pool / ("v1" if i < 6 else "v2") / src.name)
    (root / "train" / "dog").symlink_to(pool / "v1")
    first, _ = prepare(DataConfig(source="folder", root=str(root)), tmp_path / "store")
    (root / "train" / "dog").unlink()
    (root / "train" / "dog").symlink_to(pool / "v2")
    second, reused = prepare(DataConfig(source="folder", root=str(root)), tmp_path / "store")
    assert not reused
    files = second.split("train").files + second.split("val").files
    assert {Path(f).parent.name for f in files if "pool" in f} == {"v2"}
    assert all(Path(f).is_file() for f in files)


def test_a_val_fraction_that_empties_a_class_is_refused_with_counts(tmp_path):
    proc = prepare_cli(_folder_root(tmp_path, per_class=1), tmp_path / "store", "folder", "--val-fraction", "0.95")
    assert_refused(proc, "no training image left for class(es) cat, ship", "Counts per class: cat: train 0, val 1")
    assert not (tmp_path / "store").exists()


def test_an_empty_test_folder_is_refused_at_prepare_time(tmp_path):
    root = _folder_root(tmp_path)
    for cls in ("cat", "ship"):
        shutil.rmtree(root / "test" / cls)
    proc = prepare_cli(root, tmp_path / "store", "folder")
    assert_refused(proc, str(root / "test"), "no images")


def test_a_val_fraction_that_rounds_to_no_validation_image_is_refused(tmp_path):
    """10 images per class, val_fraction 0.04: round(0.4) holds out nothing from any class."""
    proc = prepare_cli(_folder_root(tmp_path, per_class=10), tmp_path / "store", "folder", "--val-fraction", "0.04")
    assert_refused(proc, "the val split is empty; raise val_fraction", "Counts per class: cat: train 10, val 0")
    assert not (tmp_path / "store").exists()


def test_a_zero_val_fraction_is_refused(tmp_path):
    proc = prepare_cli(_cifar_root(tmp_path), tmp_path / "store", "cifar10", "--val-fraction", "0")
    assert_refused(proc, "val_fraction must be in (0, 1)")


# ---------------------------------------------------------------- clear errors instead of tracebacks

@pytest.mark.parametrize("fmt", ["GIF", "ICO", "TGA", "PCX"])
def test_images_dali_cannot_decode_are_named(tmp_path, fmt):
    root = _folder_root(tmp_path)
    victim = root / "train" / "cat" / "sneaky.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(victim, format=fmt)
    proc = prepare_cli(root, tmp_path / "store", "folder")
    assert_refused(proc, str(victim), f"the content is {fmt}, not JPEG or PNG")


def test_a_negative_seed_is_refused(tmp_path):
    proc = prepare_cli(_cifar_root(tmp_path), tmp_path / "store", "cifar10", "--seed", "-1")
    assert_refused(proc, "seed must be >= 0")


def test_a_temporary_directory_left_by_a_killed_run_is_removed(tmp_path):
    """SIGTERM/SIGKILL during generation leaves .NAME.tmp-HOST-PID; the next run removes it."""
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    leftover = tmp_path / "src" / f".cifar-10-batches-py.tmp-{socket.gethostname()}-{dead_pid}"
    leftover.mkdir(parents=True)
    (leftover / "data_batch_1").write_bytes(b"half written")
    (leftover / TEMPORARY_MARKER).write_text("")  # what atomic_directory puts in each of its temporaries
    prepare(DataConfig(source="synthetic", root=str(tmp_path / "src"), synthetic_train=100, synthetic_test=20),
            tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["cifar-10-batches-py"]


def test_a_run_that_reuses_the_store_also_cleans_up_and_other_hosts_leftovers_expire(tmp_path, monkeypatch):
    """A rescheduled pod has a new hostname: its predecessor's temporaries cannot be matched by
    PID, so they are removed once nothing in them changed for ABANDONED_AFTER_SECONDS.
    A fresh one, or an old version another node has just renamed aside (a rename keeps mtimes,
    not ctimes), is left alone: that node may be committing right now. A run that only reuses
    the store cleans up too."""
    from job import atomic

    store = tmp_path / "store"
    prepare(DataConfig(source="synthetic", root=str(tmp_path / "src"), synthetic_train=100, synthetic_test=20), store)
    dead = tmp_path / f".store.tmp-{socket.gethostname()}-{2**22 + 7}"
    stale = tmp_path / ".store.tmp-old-pod-0-17"
    previous = tmp_path / "previous-version"
    for d in (dead, stale, previous):
        d.mkdir()
        (d / "meta.json").write_text("{}")
        (d / TEMPORARY_MARKER).write_text("")
    old = max(_newest_change(d) for d in (dead, stale, previous))
    while time.time() < old + 0.05:  # what follows gets later timestamps (a poll, not a fixed sleep)
        time.sleep(0.01)
    fresh = tmp_path / ".store.tmp-other-pod-1-17"
    fresh.mkdir()
    (fresh / TEMPORARY_MARKER).write_text("")
    renamed_aside = tmp_path / ".store.old-other-pod-1-17"
    previous.rename(renamed_aside)  # its files keep their old mtimes
    young = min(_newest_change(d) for d in (fresh, renamed_aside))
    assert young > old
    # The clock job.atomic reads stands between the two groups: the first past the expiry, the
    # second within it, however long a busy machine takes to get there (no wall-clock race).
    monkeypatch.setattr(atomic, "ABANDONED_AFTER_SECONDS", 3600)
    monkeypatch.setattr(atomic, "time", types.SimpleNamespace(time=lambda: old + 3600 + (young - old) / 2))
    _, reused = prepare(DataConfig(source="synthetic", root=str(tmp_path / "src"), synthetic_train=100,
                                   synthetic_test=20), store)
    assert reused
    assert not dead.exists() and not stale.exists()
    assert fresh.is_dir() and renamed_aside.is_dir()


def _newest_change(path):
    """What job.atomic ages a temporary by: its newest mtime or ctime, itself and everything inside."""
    return max(max(st.st_mtime, st.st_ctime) for st in (p.lstat() for p in (path, *path.rglob("*"))))


def test_sigterm_during_synthetic_generation_then_rerun_cleans_up(tmp_path):
    import signal
    import subprocess
    import time

    cmd = [PYTHON, "-m", "job.data", "prepare", "--source", "synthetic", "--root", str(tmp_path / "src"),
           "--out", str(tmp_path / "store"), "--num-train", "60000", "--num-test", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "src").glob(".cifar-10-batches-py.tmp-*")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert list((tmp_path / "src").glob(".cifar-10-batches-py.tmp-*"))  # what a killed run leaves
    run(cmd[:-4] + ["--num-train", "100", "--num-test", "20"])
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["cifar-10-batches-py"]
    assert os.path.isfile(tmp_path / "store" / "meta.json")
