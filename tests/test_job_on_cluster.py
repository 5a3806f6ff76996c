"""What a real cluster does to the job, through the job itself (docs/KUBERNETES.md):

* a SIGTERM that arrives while the job is still importing exits 143 (preempted, nothing to
  save yet), not 1 (a counted crash);
* a read-only mount where the run would write (the feature cache beside a read-only prepared
  store) is refused with exit 2 and the path, before any expensive work;
* ranks that see different listings of the checkpoint directory resume from the same one;
* timed checkpoints (checkpoint.every_minutes) are mid-epoch, resumable checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.runs import CIFAR_MINI, PYTHON, REPO, accelerate_launch, run, small_run
from job.preemption import EXIT_BAD_INPUT, EXIT_PREEMPTED
from job.run_dir import RunDir


def test_sigterm_while_importing_exits_143_and_reports_it(tmp_path):
    codes = tmp_path / "codes"
    codes.mkdir()
    proc = subprocess.Popen([PYTHON, "job/train.py", *small_run(tmp_path / "out", tmp_path / "prep")], cwd=REPO,
                            env={**os.environ, "JOB_EXIT_CODE_DIR": str(codes)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + 60
    while "libtorch" not in maps.read_text():  # torch is being imported: no Accelerator yet
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert (codes / "0.code").read_text().strip() == str(EXIT_PREEMPTED)  # what docker/launch.sh reads
    assert not (tmp_path / "out").exists()


def _read_only_mounts() -> str | None:
    probe = subprocess.run(["unshare", "--mount", "bash", "-c", "mount --bind -o ro /tmp /tmp"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"read-only bind mounts are not permitted here: {probe.stderr.strip()}"


def test_feature_cache_on_a_read_only_data_volume_is_refused_before_extraction(tmp_path):
    """The Kubernetes layout before the fix: the prepared store on a read-only mount and the
    feature cache beside it. The job must stop at once with exit 2 and the path, not extract
    every feature and then fail to write them."""
    if reason := _read_only_mounts():
        pytest.skip(reason)
    prep = tmp_path / "prep"  # what the data Job leaves on the data volume: the CIFAR-10 store
    run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--root", str(CIFAR_MINI),
         "--out", str(prep / "cifar10")])
    train = [PYTHON, "job/train.py", *small_run(tmp_path / "out", prep, "train.strategy=feature_extraction",
                                                data="cifar10")]
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    proc = run(["unshare", "--mount", "bash", "-c", script, str(prep), *train], check=False, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert f"features.cache_dir={prep / 'features'}" in proc.stderr and "read-only file system" in proc.stderr
    assert "fsGroup" in proc.stderr and "Traceback" not in proc.stderr
    assert "extract" not in proc.stdout + proc.stderr.split("features.cache_dir")[0]
    # A cache on a writable volume (what the manifests now give) runs.
    ok = run(["unshare", "--mount", "bash", "-c", script, str(prep), *train,
              f"features.cache_dir={tmp_path / 'runs' / 'feature-cache'}", "train.epochs=1"], timeout=300)
    assert "extracted features" in ok.stdout and RunDir(tmp_path / "out").summary_file.is_file()


def test_ranks_resume_from_the_main_process_choice(tmp_path):
    """Rank 1's listing of the checkpoints is older than rank 0's: both resume from rank 0's
    latest (without the broadcast, rank 1 would load epoch 1's)."""
    run(accelerate_launch(2, "tests/helpers/resume_probe.py", str(tmp_path)), timeout=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["listed"] == ["epoch0001-step0000017"]  # its own, stale view
    assert [r["chosen"] for r in ranks] == ["epoch0002-step0000034", "epoch0002-step0000034"]


def test_timed_checkpoints_are_mid_epoch_and_resume_to_the_same_run(tmp_path):
    out, prep = tmp_path / "out", tmp_path / "prep"
    proc = run([PYTHON, "job/train.py", *small_run(out, prep, "checkpoint.every_minutes=0.0001",
                                                   "train.signal_check_every=5", "checkpoint.keep=20")])
    names = sorted(p.name for p in RunDir(out).checkpoints.iterdir())
    assert names == ["epoch0000-step0000005", "epoch0000-step0000010", "epoch0000-step0000015",
                     "epoch0001-step0000017", "epoch0001-step0000020", "epoch0001-step0000025",
                     "epoch0001-step0000030", "epoch0002-step0000034"], names
    assert "(checkpoint.every_minutes=0.0001)" in proc.stdout
    # The node is lost after step 25: resume from the timed checkpoint, mid epoch 2.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in names[names.index("epoch0001-step0000025") + 1:]:
        shutil.rmtree(RunDir(again).checkpoints / name)
    RunDir(again).summary_file.unlink()
    resumed = run([PYTHON, "job/train.py", *small_run(again, prep, "checkpoint.every_minutes=0")])
    assert "resumed from" in resumed.stdout and "epoch0001-step0000025" in resumed.stdout
    keys = ("epoch", "step", "train_loss", "train_accuracy", "train_samples", "val_loss", "val_accuracy")
    history = lambda d: [{k: getattr(h, k) for k in keys} for h in RunDir(d).epochs()]  # noqa: E731
    assert history(again) == history(out)
    assert RunDir(again).summary().test_accuracy == RunDir(out).summary().test_accuracy
