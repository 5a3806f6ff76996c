"""bench/results.py: docs/RESULTS.md's table is built from the rows' measured records (committed in
docs/results/rows/), never typed; a failed row can be retried as it is."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench import results, time_to_accuracy

REPO = Path(__file__).resolve().parent.parent


def _result(key: str, accuracy: float, extraction: float | None) -> results.Result:
    return results.Result(key, f"row {key}", accuracy, 10_000, [("cat", 0.6), ("dog", 0.7)], extraction, 100.0,
                          200.0, 500.0, 60_000 if extraction is not None else 0, 2.0, f"python job/train.py {key}",
                          0.95)


def _committed() -> dict[str, results.Result]:
    return {p.stem: results.Result(**json.loads(p.read_text())) for p in sorted(results.RECORDS.glob("*.json"))}


def test_the_published_table_is_the_one_its_committed_records_build():
    records = _committed()
    if not records:
        pytest.skip(f"no row records in {results.RECORDS} yet")
    assert set(records) <= {r.key for r in results.recipes(1)}
    doc = results.DOC.read_text()
    published = doc.split(results.START)[1].split(results.END)[0]
    # led by the one-hour preset's best record of the time-to-accuracy ledger, when there is one
    headline = time_to_accuracy.headline(time_to_accuracy.read_ledger())
    stale = "docs/RESULTS.md or README.md is stale: run `make results-doc`"
    assert results.table(results.recipes(1), records, headline) in published, stale
    assert results.short_table(results.recipes(1), records, headline) in _readme_block(), stale
    for key, r in records.items():  # each row's command is the one it ran, as the reader's checkout spells it
        assert f"- `{key}`: `{r.command}`" in published and str(results.REPO) not in r.command
        assert f"train.output_dir=runs/results/{key}" in published


def _readme_block() -> str:
    text = results.README.read_text()
    return text.split(results.START)[1].split(results.END)[0]


def test_a_row_kept_on_this_machine_wins_over_its_committed_record(tmp_path, monkeypatch):
    records = tmp_path / "rows"
    records.mkdir()
    monkeypatch.setattr(results, "RECORDS", records)
    work = tmp_path / "work"
    (records / "head-160.json").write_text(json.dumps(asdict(_result("head-160", 0.80, 450.0))))
    assert results.recorded("head-160", work).test_accuracy == 0.80
    assert results.recorded("probe-160", work) is None
    (work / "head-160").mkdir(parents=True)
    (work / "head-160" / "result.json").write_text(json.dumps(asdict(_result("head-160", 0.81, 440.0))))
    assert results.recorded("head-160", work).test_accuracy == 0.81


def test_rows_on_shared_features_show_the_extraction_they_reused():
    all_recipes = results.recipes(1)
    rows = {"head-160": _result("head-160", 0.83, 450.0), "probe-160": _result("probe-160", 0.81, 0.0),
            "finetune-plain": _result("finetune-plain", 0.84, None)}
    text = results.table(all_recipes, rows)
    lines = {line.split(" | ")[0]: line for line in text.splitlines()}
    assert "| 450 |" in lines["| row head-160"] and "| (450) |" in lines["| row probe-160"]
    assert "| - |" in lines["| row finetune-plain"]
    assert text.count("| not run |") == len(all_recipes) - 3
    short = results.short_table(all_recipes, rows)
    assert "on the features the row above computed" in short.splitlines()[3]  # probe-160 row
    assert re.search(r"row finetune-plain \| 0\.8400 \| 3 min \|", short)


def test_only_the_text_between_the_markers_is_replaced(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{results.START}\nold\n{results.END}\noutro\n")
    results.replace_between(page, "new table")
    results.replace_between(page, "newer table")
    assert page.read_text() == f"intro\n{results.START}\nnewer table\n{results.END}\noutro\n"


def test_a_failed_row_leaves_its_log_beside_the_run_and_can_be_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RECORDS", tmp_path / "rows")
    recipe = results.Recipe("head-160", "x", "job/configs/demo.yaml", ("model.weights=/nonexistent.safetensors",))
    with pytest.raises(SystemExit, match=r"\[head-160\] exit 2") as first:
        results.run_recipe(recipe, tmp_path / "cifar", tmp_path / "work")
    assert (tmp_path / "work" / "head-160.log").is_file()
    assert not (tmp_path / "work" / "head-160").exists()  # nothing the job would refuse to overwrite
    assert not (tmp_path / "rows").exists()  # no record of a row that did not run
    # the retry fails for the same reason, not for a folder the first try left behind
    with pytest.raises(SystemExit) as second:
        results.run_recipe(recipe, tmp_path / "cifar", tmp_path / "work")
    assert str(second.value) == str(first.value)


def test_a_record_spells_the_command_as_any_checkout_runs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RECORDS", tmp_path / "rows")
    measured = replace(_result("probe-224", 0.82, 0.0),
                       command=f"python job/train.py train.output_dir={results.REPO}/runs/results/probe-224")
    results.record(measured)
    kept = json.loads((tmp_path / "rows" / "probe-224.json").read_text())
    assert kept["command"] == "python job/train.py train.output_dir=runs/results/probe-224"
    assert {k: v for k, v in kept.items() if k != "command"} == \
        {k: v for k, v in json.loads(json.dumps(asdict(measured))).items() if k != "command"}
