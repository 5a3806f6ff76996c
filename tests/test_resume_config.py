"""Resume never surprises (job/checkpoint.py: check_resume, RESUME_MAY_CHANGE): a changed key is
refused with every difference before anything is written, a finished run launched again says so
and touches nothing, a larger train.epochs extends it, and each resume is recorded in resumes.jsonl
while config.yaml keeps describing the weights. Runs are the small synthetic run, in-process."""
from __future__ import annotations

import shutil

import pytest
import yaml

from helpers.runs import REPO, snapshot
from job.checkpoint import RESUME_MAY_CHANGE, config_differences, may_change_on_resume
from job.config import load_config
from job.run_dir import RunDir

SMALL = str(REPO / "tests" / "configs" / "small.yaml")


def args(out, prepared, *overrides):
    return ["--config", SMALL, f"train.output_dir={out}", f"data.prepared_dir={prepared}",
            "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides]


def test_only_the_named_keys_may_differ_and_every_other_difference_is_listed():
    saved = load_config(SMALL).to_dict()
    current = load_config(SMALL, ["optim.lr=0.2", "train.seed=3", "train.epochs=9", "tracking.project=x",
                                  "data.num_threads=2", "checkpoint.every_minutes=5"]).to_dict()
    assert config_differences(saved, current) == {"optim.lr": (0.003, 0.2), "train.seed": (0, 3)}
    assert may_change_on_resume("tracking.tags") and may_change_on_resume("train.epochs")
    assert not may_change_on_resume("train.strategy") and not may_change_on_resume("optim.lr")
    assert "train.epochs" in RESUME_MAY_CHANGE and "data.num_threads" in RESUME_MAY_CHANGE
    # a global batch: the per-process share follows the world size, the global batch must match
    saved["data"]["global_batch_size"] = current["data"]["global_batch_size"] = 64
    current["data"]["batch_size"] = 16
    assert "data.batch_size" not in config_differences(saved, current)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run; tests copy it before changing it."""
    from job.train import main

    tmp = tmp_path_factory.mktemp("resume")
    assert main(args(tmp / "run", tmp / "prep")) == 0
    return tmp


def copied(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def test_a_finished_run_launched_again_says_so_and_touches_nothing(finished, capsys):
    from job.train import main

    out = finished / "run"
    before = snapshot(out)
    capsys.readouterr()
    # unchanged, and with keys a resume may change (tracking, logging cadence, threads)
    for extra in ([], ["tracking.project=other", "train.log_every=7", "data.num_threads=2"]):
        assert main(args(out, finished / "prep", *extra)) == 0
        said = capsys.readouterr().out
        summary = RunDir(out).summary()
        assert "holds a finished run" in said and f"test accuracy {summary.test_accuracy:.4f}" in said, said
        assert str(RunDir(out).summary_file) in said and "train.epochs (> 2)" in said
    assert snapshot(out) == before


def test_a_changed_key_is_refused_with_every_difference_and_nothing_is_written(finished, tmp_path, capsys):
    from job.train import main

    out = copied(finished, tmp_path)
    (out / "metrics.json").unlink()  # mid-run too (the checkpoint's config decides), not only finished runs
    before = snapshot(out)
    capsys.readouterr()
    assert main(args(out, finished / "prep", "optim.lr=0.2", "train.seed=3", "train.epochs=5")) == 2
    err = capsys.readouterr().err
    assert "checkpoints/epoch0002-step0000012 was written with another config" in err, err
    assert "2 key(s) differ" in err
    assert "optim.lr=0.003 there, optim.lr=0.2 in this run" in err
    assert "train.seed=0 there, train.seed=3 in this run" in err
    assert "train.epochs=" not in err.split("Ways out")[0]  # may change: not listed as a difference
    for way_out in ("a new train.output_dir", "train.resume=never", "set the key(s) back"):
        assert way_out in err
    assert err.strip().splitlines()[-1].startswith("job/train.py: exit code 2: bad config")
    assert snapshot(out) == before  # config.yaml still says lr 0.003: what the weights were trained with


def test_a_larger_epochs_extends_the_run_and_the_resume_is_recorded(finished, tmp_path):
    from job.train import main

    out = copied(finished, tmp_path)
    assert main(args(out, finished / "prep", "train.epochs=3", "checkpoint.keep=3")) == 0
    run = RunDir(out)
    assert run.summary().epochs_completed == 3 and [r.epoch for r in run.epochs()] == [0, 1, 2]
    saved = yaml.safe_load(run.config_file.read_text())
    assert saved["train"]["epochs"] == 3 and saved["optim"]["lr"] == 0.003
    (entry,) = run.resumes()
    assert entry["world_size"] == 1 and entry["checkpoint"] == "epoch0002-step0000012"
    assert entry["overrides"] == {"train.epochs": {"was": 2, "now": 3}, "checkpoint.keep": {"was": 2, "now": 3},
                                  "train.output_dir": {"was": str(finished / "run"), "now": str(out)}}
    assert entry["time"].endswith("+00:00")


def test_starting_over_replaces_the_earlier_runs_outputs(finished, tmp_path, capsys):
    """train.resume=never in a finished run's folder: none of its weights, records or checkpoints
    stay beside the new config.yaml (a later resume=auto would otherwise continue the old run)."""
    from job.train import main

    out = copied(finished, tmp_path)
    run = RunDir(out)
    run.record_resume(out / "checkpoints" / "epoch0002-step0000012", 1, {})
    assert (out / "checkpoints" / "epoch0002-step0000012").is_dir() and run.resumes_file.is_file()
    capsys.readouterr()
    assert main(args(out, finished / "prep", "train.resume=never", "train.epochs=1", "optim.lr=0.2")) == 0
    said = capsys.readouterr().out
    assert ("removed the earlier run's best/, 2 checkpoint(s), metrics.json, history.jsonl, resumes.jsonl"
            in said), said
    saved = yaml.safe_load(run.config_file.read_text())
    assert saved["optim"]["lr"] == 0.2 and saved["train"]["epochs"] == 1
    assert run.summary().epochs_completed == 1 and [r.epoch for r in run.epochs()] == [0]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch0001-step0000006"]
    assert not run.resumes_file.exists()
    assert run.summary().best_epoch == 0 and run.summary().global_steps == 6
