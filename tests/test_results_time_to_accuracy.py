"""bench/cpu_hour.py and bench/time_to_accuracy.py: a timed run's figures come from the run's own
files into one ledger line, a missing or failed run is refused (exit 2) with nothing recorded,
and the Pareto front, the lever pairs, the plot and docs/RESULTS.md's section are built from the
ledger alone."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from bench import cpu_hour, results, time_to_accuracy
from bench.time_to_accuracy import Record
from job.config import load_config
from job.records import EpochRecord, RunSummary
from job.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
SMALL = REPO / "tests" / "configs" / "small.yaml"


def _epoch(epoch: int, val_accuracy: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=10 * (epoch + 1), lr=0.01, train_loss=1.0, train_accuracy=0.5,
                       train_samples=320, epoch_seconds=100.0 + epoch, images_per_second=3.2,
                       images_per_second_per_device=3.2, data_wait_fraction=0.0, val_loss=0.5,
                       val_accuracy=val_accuracy, val_samples=60)


def finished_run(out: Path) -> RunDir:
    """The files a finished run leaves that the ledger reads: config.yaml, history.jsonl, metrics.json."""
    run = RunDir(out)
    out.mkdir(parents=True)
    load_config(SMALL, [f"train.output_dir={out}"]).save(run.config_file)
    run.history_file.write_text(_epoch(0, 0.81).to_json() + "\n" + _epoch(1, 0.87).to_json() + "\n")
    summary = RunSummary(test_accuracy=0.9311, test_loss=0.3, test_samples=10_000,
                         test_per_class_accuracy={"cat": 0.8, "dog": 0.85, "ship": 0.97}, best_val_accuracy=0.87,
                         best_epoch=1, epochs_completed=2, stopped_early=False, world_size=1, global_steps=20,
                         train_images_per_second=150.0, train_images_per_second_per_device=150.0,
                         data_wait_fraction=0.0, confusion_matrix=[[1]], classes=["cat", "dog", "ship"],
                         test_accuracy_tta=0.9342)
    run.summary_file.write_text(summary.to_json())
    return run


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    path = tmp_path / "docs" / "results" / "time_to_accuracy.jsonl"
    monkeypatch.setattr(time_to_accuracy, "LEDGER", path)
    return path


def test_a_finished_run_becomes_one_ledger_record_read_from_its_files(tmp_path, ledger):
    run = finished_run(tmp_path / "run")
    made = cpu_hour.Invocation("cpu_hour", "python job/train.py --config c.yaml", f"{REPO}/job/configs/cpu_hour.yaml",
                               ["train.seed=1"], 3000.0, "bench/cpu_hour.py", cpu_seconds=5400.0,
                               load_average_before=0.1, store_existed_at_launch=False, commit="abc", dirty=False)
    record = cpu_hour.record_of(run.path, made)
    assert (record.test_accuracy, record.test_accuracy_tta, record.test_samples) == (0.9311, 0.9342, 10_000)
    assert record.epochs == [{"epoch": 0, "val_accuracy": 0.81, "val_accuracy_ema": None, "epoch_seconds": 100.0},
                             {"epoch": 1, "val_accuracy": 0.87, "val_accuracy_ema": None, "epoch_seconds": 101.0}]
    assert record.weakest == [["cat", 0.8], ["dog", 0.85]] and record.model == "test_resnet"
    assert record.cpu_share == pytest.approx(5400.0 / (3000.0 * os.cpu_count()))
    assert record.config == "job/configs/cpu_hour.yaml"  # as a checkout spells it
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record.finished)
    time_to_accuracy.append(record)
    time_to_accuracy.append(record)
    assert time_to_accuracy.read_ledger() == [record, record]
    assert len(ledger.read_text().splitlines()) == 2


def test_a_missing_or_unfinished_run_is_refused_and_nothing_recorded(tmp_path, ledger, capsys):
    with pytest.raises(cpu_hour.Refused, match="metrics.json not found: no finished run"):
        cpu_hour.record_of(tmp_path / "nothing", cpu_hour.Invocation("x", "c", "c", [], 1.0, "m"))
    log = tmp_path / "run1.log"
    log.write_text("training...\nWALL_SECONDS 3512.25 rc=0\n")
    code = cpu_hour.main(["--record-existing", str(tmp_path / "nothing"), "--wall-log", str(log),
                          "--command", f"python job/train.py --config {SMALL}"])
    assert code == 2
    assert "refused" in capsys.readouterr().err and not ledger.exists()
    log.write_text("WALL_SECONDS 12.5 rc=1\n")
    assert cpu_hour.main(["--record-existing", str(finished_run(tmp_path / "run").path), "--wall-log", str(log),
                          "--command", f"python job/train.py --config {SMALL}"]) == 2
    assert "the run exited 1" in capsys.readouterr().err and not ledger.exists()


def test_a_run_made_outside_is_recorded_with_its_logged_wall_time_if_the_command_matches(tmp_path, ledger, capsys):
    run = finished_run(tmp_path / "run1")
    log = tmp_path / "run1.log"
    log.write_text("step 50: loss 2.0\nWALL_SECONDS 3512.25 rc=0\n")
    command = f"/somewhere/bin/python job/train.py --config {SMALL} \\\n  train.output_dir={run.path}"
    assert cpu_hour.main(["--record-existing", str(run.path), "--wall-log", str(log), "--command", command,
                          "--label", "lever:ema:on"]) == 0
    (record,) = time_to_accuracy.read_ledger()
    assert record.label == "lever:ema:on" and record.wall_seconds == 3512.25 and record.cpu_share is None
    # the command as given, its paths inside the repository as a checkout spells them
    assert record.command == f"/somewhere/bin/python job/train.py --config tests/configs/small.yaml " \
                             f"train.output_dir={run.path}"
    assert "WALL_SECONDS line of" in record.wall_measured_by and record.test_accuracy == 0.9311
    # a command that does not resolve to the run's saved config is refused, naming the key
    assert cpu_hour.main(["--record-existing", str(run.path), "--wall-seconds", "100", "--command",
                          f"{command} train.epochs=9"]) == 2
    assert "train.epochs: run 2, command 9" in capsys.readouterr().err
    assert len(time_to_accuracy.read_ledger()) == 1


FAKE_JOB = """import shutil, sys
words = dict(w.split("=", 1) for w in sys.argv[1:] if "=" in w)
print("fake job", sys.argv[1:], flush=True)
if words.get("train.seed") == "13":
    sys.exit(3)
shutil.copytree({source!r}, words["train.output_dir"], copy_function=shutil.copyfile)
"""


def test_the_runner_times_the_command_and_records_what_its_run_wrote(tmp_path, ledger, monkeypatch, capsys):
    source = finished_run(tmp_path / "made")
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_JOB.format(source=str(source.path)))
    monkeypatch.setattr(cpu_hour, "ENTRY", str(fake))
    out = tmp_path / "runs" / "cpu_hour"
    argv = ["--config", str(SMALL), "--label", "cpu_hour", "--", f"train.output_dir={out}",
            f"data.prepared_dir={tmp_path / 'prep'}"]
    assert cpu_hour.main(argv) == 0
    (record,) = time_to_accuracy.read_ledger()
    assert record.command == f"python {fake} --config tests/configs/small.yaml train.output_dir={out} " \
                             f"data.prepared_dir={tmp_path / 'prep'}"
    assert record.wall_seconds > 0 and record.cpu_seconds >= 0 and record.cpu_count == os.cpu_count()
    assert record.load_average_before is not None and record.store_existed_at_launch is False
    assert record.test_accuracy == 0.9311 and record.wall_measured_by == "bench/cpu_hour.py"
    assert "fake job" in (tmp_path / "runs" / "cpu_hour.log").read_text()
    # the same folder again would resume the finished run: refused before anything runs
    assert cpu_hour.main(argv) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    # a failed run is refused, nothing recorded
    assert cpu_hour.main([*argv[:-2], f"train.output_dir={tmp_path / 'other'}", "train.seed=13"]) == 2
    assert "the run exited 3" in capsys.readouterr().err and len(time_to_accuracy.read_ledger()) == 1
    assert cpu_hour.main(["--label", "lever:two words:on", "--", "train.seed=1"]) == 2


def _record(label: str, minutes: float, accuracy: float, tta: float | None = None) -> Record:
    return Record(label=label, command=f"python job/train.py --config job/configs/cpu_hour.yaml # {label}",
                  config="job/configs/cpu_hour.yaml", overrides=[], run_dir="runs/cpu_hour",
                  wall_seconds=minutes * 60, wall_measured_by="bench/cpu_hour.py", cpu_count=2,
                  load_average_before=0.05, cpu_seconds=minutes * 60 * 1.9, cpu_share=0.95, test_accuracy=accuracy,
                  test_accuracy_tta=tta, test_samples=10_000, weakest=[["cat", 0.8], ["dog", 0.86]],
                  model="tf_efficientnet_lite0", train_images_per_second=150.0,
                  epochs=[{"epoch": 0, "val_accuracy": 0.9, "val_accuracy_ema": None, "epoch_seconds": 600.0}],
                  store_existed_at_launch=False, commit="0123456789abcdef", dirty=False,
                  finished="2026-12-08T10:00:00+00:00")


def test_the_pareto_front_is_the_best_accuracy_within_each_wall_time():
    points = [(10, 0.80), (15, 0.79), (20, 0.85), (25, 0.85), (30, 0.84), (40, 0.88), (40, 0.90), (5, 0.70)]
    # by hand: 5 -> 0.70; 10 -> 0.80; 15 and 0.79 is beaten by 10; 20 -> 0.85; 25 only ties it;
    # 30 is beaten; at 40, 0.90 beats 0.88
    assert time_to_accuracy.pareto_front(points) == [(5, 0.70), (10, 0.80), (20, 0.85), (40, 0.90)]
    assert time_to_accuracy.pareto_front([]) == []
    records = [_record(f"r{i}", wall, acc) for i, (wall, acc) in enumerate(points)]
    assert [r.label for r in time_to_accuracy.front_records(records)] == ["r7", "r0", "r2", "r6"]
    assert time_to_accuracy.best_within(records, 30 * 60).label == "r2"
    assert time_to_accuracy.best_within(records, 4 * 60) is None


def test_lever_records_pair_by_name_the_latest_of_each_side():
    records = [_record("lever:ema:off", 50, 0.90), _record("lever:ema:on", 52, 0.905),
               _record("lever:ema:on", 53, 0.912), _record("lever:mixup:on", 55, 0.88), _record("cpu_hour", 58, 0.93)]
    ema, mixup = time_to_accuracy.lever_pairs(records)
    assert (ema.name, ema.off.test_accuracy, ema.on.test_accuracy) == ("ema", 0.90, 0.912)
    assert ema.difference == pytest.approx(0.012)
    assert (mixup.name, mixup.off, mixup.difference) == ("mixup", None, None)
    table = time_to_accuracy.lever_table([ema, mixup])
    assert "| ema | 0.9000 | 0.9120 | +0.0120 | 50.0 min | 53.0 min |" in table
    assert "| mixup | not run | 0.8800 | - | - | 55.0 min |" in table


def test_a_run_recorded_again_under_a_lever_label_is_one_row_and_one_point_but_pairs():
    baseline = _record("cpu_hour", 44.5, 0.9073)
    again = dataclasses.replace(baseline, label="lever:trunk:off")
    records = [baseline, _record("trunk", 44, 0.92), again, dataclasses.replace(_record("trunk", 44, 0.92),
                                                                                label="lever:trunk:on")]
    runs = time_to_accuracy.distinct_runs(records)
    assert [r.label for r in runs] == ["cpu_hour, lever:trunk:off", "trunk, lever:trunk:on"]
    (pair,) = time_to_accuracy.lever_pairs(records)
    assert pair.difference == pytest.approx(0.92 - 0.9073)
    text = time_to_accuracy.section(records)
    assert text.count("| `cpu_hour, lever:trunk:off` |") == 1 and "| trunk | 0.9073 | 0.9200 | +0.0127 |" in text
    assert "The best `cpu_hour` record does not meet" in text


def test_the_plot_has_every_record_the_front_and_both_targets_and_is_the_same_each_time(tmp_path):
    records = [_record("cpu_hour", 58, 0.931, 0.934), _record("lever:ema:off", 40, 0.90), _record("slow", 70, 0.92)]
    svg = tmp_path / "plot.svg"
    time_to_accuracy.plot(records, svg)
    text = svg.read_text()
    for index, r in enumerate(records):
        assert f'id="record-{index}"' in text and f">{r.label}</text>" in text
    for gid in ("pareto-front", "pareto-points", "target-accuracy", "target-minutes"):
        assert f'id="{gid}"' in text
    first = svg.read_bytes()
    time_to_accuracy.plot(records, svg)
    assert svg.read_bytes() == first


def test_the_section_leads_with_the_best_cpu_hour_record_and_says_when_there_is_none():
    assert "No run is recorded yet" in time_to_accuracy.section([])
    records = [_record("cpu_hour", 59, 0.931, 0.934), _record("cpu_hour", 57, 0.929), _record("lever:ema:on", 30, 0.95)]
    assert time_to_accuracy.headline(records) is records[0]
    text = time_to_accuracy.section(records)
    assert "best of 2 records; test accuracy 0.9290 to 0.9310) meets the target" in text
    assert "| `cpu_hour` | **0.9310** (10000) | 0.9340 | 59.0 min | 0.95 (2 cores, load 0.05 before) | yes |" in text
    assert "![test accuracy against wall time, with the Pareto front](results/time_to_accuracy.svg)" in text
    assert "| ema | not run | 0.9500 | - |" in text
    assert "Best within 60 min, any record: `lever:ema:on`, 0.9500 in 30.0 min." in text
    # make results' table and the README's lead with it
    rows = results.table(results.recipes(1), {}, records[0]).splitlines()
    assert rows[2].startswith("| one-hour preset `cpu_hour`: tf_efficientnet_lite0, 1 ep | **0.9310** (10000), "
                              "flip-TTA 0.9340 | cat 0.80, dog 0.86 | - | 600 | 3540 | 150 | 0.95 |")
    assert results.short_table(results.recipes(1), {}, records[0]).splitlines()[2] == \
        "| one-hour preset `cpu_hour`: tf_efficientnet_lite0, 1 ep | 0.9310 (flip-TTA 0.9340) | 59 min |"
    assert results.commands(results.recipes(1), {}, records[0]) == f"- `cpu_hour`: `{records[0].command}`"


def test_the_published_section_is_the_one_the_committed_ledger_builds():
    records = time_to_accuracy.read_ledger()
    doc = results.DOC.read_text()
    published = doc.split(time_to_accuracy.START)[1].split(time_to_accuracy.END)[0].strip()
    assert published == time_to_accuracy.section(records), "docs/RESULTS.md is stale: run `make results-doc`"
    assert time_to_accuracy.FIGURE.is_file() == bool(records)


def test_a_damaged_ledger_line_is_refused_by_file_and_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"label": "x"}) + "\n")
    with pytest.raises(time_to_accuracy.LedgerError, match=f"{re.escape(str(path))}: line 1 is not a record"):
        time_to_accuracy.read_ledger(path)


def test_the_doc_rewrite_writes_the_plot_and_the_section_between_the_markers(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text(f"intro\n{time_to_accuracy.START}\nold\n{time_to_accuracy.END}\n{results.START}\nrows\n"
                   f"{results.END}\n")
    monkeypatch.setattr(results, "DOC", doc)
    monkeypatch.setattr(time_to_accuracy, "FIGURE", tmp_path / "docs" / "results" / "time_to_accuracy.svg")
    records = [_record("cpu_hour", 58, 0.931)]
    results.write_time_to_accuracy(records)
    text = doc.read_text()
    assert text.startswith(f"intro\n{time_to_accuracy.START}\n{time_to_accuracy.section(records)}\n")
    assert text.endswith(f"{results.START}\nrows\n{results.END}\n") and time_to_accuracy.FIGURE.is_file()
