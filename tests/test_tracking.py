"""W&B (offline: no server here) and local plots, read back from the files they write."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from helpers.runs import PYTHON, REPO, run, small_run
from helpers.wandb_log import summarize
from job.config import load_config
from job.run_dir import RunDir

pytestmark = pytest.mark.slow


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def wandb_runs(out: Path) -> list[Path]:
    return sorted(RunDir(out).wandb.glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """An offline run made with a (fake) API key set: the key must appear in none of its outputs."""
    out = tmp_path_factory.mktemp("wandb") / "demo"
    args = small_run(out, out.parent / "prepared", "tracking.wandb=offline", "data.synthetic_test=300",
                     "train.log_every=5")
    proc = run([PYTHON, "job/train.py", *args], env={"WANDB_API_KEY": FAKE_KEY})
    assert FAKE_KEY not in proc.stdout + proc.stderr
    return out


FAKE_KEY = "fake0wandb0key0" + "7" * 25  # 40 characters, the shape of a real key


def test_the_wandb_key_appears_in_no_output_file(offline_run):
    files = [p for p in offline_run.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.suffix == ".wandb" for p in files)
    for path in files:  # config.yaml, history, metrics, checkpoints, best/, the W&B log and files
        assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_offline_run_records_config_summary_and_model(offline_run):
    files = wandb_runs(offline_run)
    assert len(files) == 1, files
    log = summarize(files[0])
    metrics = RunDir(offline_run).summary()
    assert len(log["run_ids"]) == 1 and files[0].name == f"run-{log['run_ids'].pop()}.wandb"
    config = log["config"]
    assert config["train"]["epochs"] == 2 and config["model"]["name"] == "test_resnet"
    assert config["run"]["world_size"] == 1 and "torch" in config["run"] and "git_commit" in config["run"]
    summary = log["summary"]
    assert summary["test_accuracy"] == metrics.test_accuracy
    assert summary["test_samples"] == metrics.test_samples == 300
    assert summary["best_epoch"] == metrics.best_epoch and summary["epoch"] == 2
    epochs = [h for h in log["history"] if "val/accuracy" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert any("train/loss" in h and "train/images_per_second" in h for h in log["history"])
    assert summary["test/samples/count"] == 16 and "pred: " in summary["test/samples/captions"][0]
    step = next(r.step for r in RunDir(offline_run).epochs() if r.epoch == metrics.best_epoch)
    models = [a for a in log["artifacts"] if a["type"] == "model"]
    assert models == [{"name": f"model-{files[0].stem[4:]}", "aliases": models[0]["aliases"], "type": "model"}]
    assert {"best", f"step-{step}"} <= set(models[0]["aliases"])


def test_an_export_is_attached_to_the_runs_wandb_run(offline_run, tmp_path):
    """python -m job.export --wandb: the run's W&B run (resumed, same id) gets the export as the
    model artifact model-<id>-onnx, beside best/'s, with the card and the verification figure."""
    import shutil

    from helpers.wandb_log import records

    offline_run = Path(shutil.copytree(offline_run, tmp_path / "run"))  # the other tests' run stays as it was
    run_id = wandb_runs(offline_run)[0].stem[4:]
    out = tmp_path / "model.onnx"
    proc = run([PYTHON, "-m", "job.export", "--run", str(offline_run), "--format", "onnx", "--out", str(out),
                "--wandb"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["wandb_artifact"] == f"model-{run_id}-onnx"
    files = wandb_runs(offline_run)
    assert len(files) == 2 and files[0].name == files[1].name  # a second process start of the same run
    [artifact] = [r.artifact for r in records(files[1]) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.name == f"model-{run_id}-onnx" and artifact.type == "model" and "best" in artifact.aliases
    assert [m.path for m in artifact.manifest.contents] == ["model.onnx"]
    meta = json.loads(artifact.metadata)
    assert meta["format"] == "onnx" and meta["source_artifact"] == f"model-{run_id}"
    assert meta["max_probability_difference"] == result["max_probability_difference"] <= 1e-4
    assert meta["card"] == json.loads(RunDir(offline_run).card_file.read_text())
    assert meta["test_accuracy"] == RunDir(offline_run).summary().test_accuracy


def test_pngs_and_confusion_counts(offline_run):
    run_dir = RunDir(offline_run)
    metrics = run_dir.summary()
    assert png_size(run_dir.curves_png) == (1500, 400)
    assert png_size(run_dir.confusion_png) == (800, 700)
    assert png_size(run_dir.samples_png)[0] == 1600
    assert sum(map(sum, metrics.confusion_matrix)) == metrics.test_samples
    table = next(wandb_runs(offline_run)[0].parent.glob("files/media/table/test/confusion_matrix_table_*.json"))
    rows = json.loads(table.read_text())["data"]
    assert sum(row[2] for row in rows) == metrics.test_samples


def test_sweep_parameters_are_real_config_keys():
    sweep = yaml.safe_load((REPO / "job" / "sweeps" / "finetune_bayes.yaml").read_text())
    assert sweep["method"] == "bayes" and sweep["early_terminate"]["type"] == "hyperband"
    assert sweep["command"][1:4] == ["accelerate", "launch", "${program}"] and sweep["program"] == "job/train.py"
    overrides = []
    for key, spec in sweep["parameters"].items():
        value = spec.get("value", (spec.get("values") or [spec.get("min")])[0])
        overrides.append(f"{key}={value}")
    cfg = load_config(REPO / sweep["command"][5], overrides)  # raises on any unknown key or bad value
    assert cfg.train.output_dir == "runs/sweep"
    for key in ("optim.lr", "optim.weight_decay", "loss.label_smoothing", "data.image_size", "train.strategy"):
        assert key in sweep["parameters"]
