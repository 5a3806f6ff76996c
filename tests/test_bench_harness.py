"""bench/harness.py: every benchmark runs its jobs one way (timed, logged beside the run, refused
on failure, its row kept), and the bench scripts take the recipe's switches and the EMA's decay
from where they are defined."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from bench import harness, recipe, results


def test_a_job_is_timed_and_its_output_kept_beside_its_run(tmp_path):
    out = tmp_path / "work" / "row-a"
    log = harness.log_beside(out)
    assert log == tmp_path / "work" / "row-a.log"
    done = harness.run_job([sys.executable, "-c", "import sys; print('to out'); print('to err', file=sys.stderr)"],
                           log=log, label="[row-a]")
    assert (done.returncode, done.stdout, done.stderr) == (0, "to out\n", "to err\n")
    assert log.read_text() == "to out\nto err\n"
    assert done.wall_seconds > 0 and done.cpu_share >= 0
    assert not out.exists()  # the log is beside the run, never inside it


def test_a_failed_job_is_refused_naming_its_log_and_tail(tmp_path):
    log = tmp_path / "row-b.log"
    with pytest.raises(harness.JobFailed) as failed:
        harness.run_job([sys.executable, "-c", "print('the reason'); raise SystemExit(3)"], log=log, label="[row-b]")
    assert str(failed.value) == f"[row-b] exit 3; log in {log}:\nthe reason\n"
    assert isinstance(failed.value, SystemExit) and log.read_text() == "the reason\n"
    done = harness.run_job([sys.executable, "-c", "raise SystemExit(3)"], log=None, label="x", check=False)
    assert done.returncode == 3


def test_a_kept_row_reads_back_equal(tmp_path):
    @dataclass
    class Row:
        name: str
        accuracy: float
        curve: list[float]

    path = tmp_path / "run" / "row.json"
    assert harness.kept_row(path, Row) is None
    harness.keep_row(path, Row("plain", 0.83, [0.5, 0.7]))
    assert harness.kept_row(path, Row) == Row("plain", 0.83, [0.5, 0.7])


def test_results_uses_the_recipes_switches():
    assert results.RECIPE == recipe.RECIPE
    assert results.PLAIN[:len(recipe.PLAIN)] == recipe.PLAIN
    assert len(results.PLAIN) == len(recipe.PLAIN) + 1  # and no test-time flips on its plain row


def test_timm_gets_the_jobs_ema_decay():
    from job.config import load_config
    from job.ema import WeightEma, ema_decay

    cfg = load_config(recipe.PRESET, list(recipe.RECIPE))
    flags = recipe.timm_flags(cfg, updates_per_epoch=71)
    decay = float(flags[flags.index("--model-ema-decay") + 1])
    assert decay == pytest.approx(ema_decay(0.5, 71), abs=1e-6) == pytest.approx(1 - 1 / 35.5, abs=1e-6)
    assert WeightEma(__import__("torch").nn.Linear(2, 2), 0.5, 71).decay == ema_decay(0.5, 71)
