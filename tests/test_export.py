"""python -m job.export end to end: the demo preset's run (frozen Lite0, the recipe's MLP head)
and a fine-tuned one (finetune_lite0.yaml, linear head, weight EMA) trained on the real CIFAR-10
sample, exported to ONNX, torch.export and timm, each checked against the run's own predictions
(predict.py's pipeline) on the 500 real test JPEGs, in a process that cannot import this project;
then every refusal through the CLI."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers.runs import CIFAR_TARBALL, FOLDER_MINI, PYTHON, assert_refused, run, small_run, snapshot
from helpers.wandb_log import records
from job.run_dir import RunDir

pytestmark = pytest.mark.slow

TEST_IMAGES = sorted(str(p) for p in (FOLDER_MINI / "test").glob("*/*.jpg"))  # 500 real CIFAR-10 test JPEGs
# The exports resize as predict.py's pipeline does (linear, rounded to whole grey levels). At 64 px
# (2x CIFAR) the resize weights are exact in binary, so every runtime rounds alike: measured max
# 5.8e-6 (fine-tuned run) and 2.4e-6 (demo run) from predict.py's probabilities.
PREDICT_TOLERANCE = 1e-4
SIZE = 64


def lite0_run(out: Path, prepared: Path, preset: str, *extra: str) -> Path:
    from job.weights import packaged_efficientnet_lite0

    run([PYTHON, "job/train.py", "--config", f"job/configs/{preset}", f"train.output_dir={out}",
         f"data.prepared_dir={prepared}", f"data.root={CIFAR_TARBALL}", f"data.image_size={SIZE}",
         f"model.weights={packaged_efficientnet_lite0()}", "tracking.wandb=offline", "train.resume=never", *extra],
        timeout=900)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"demo": the demo preset (feature extraction, head 1024/512/256), "finetuned":
    finetune_lite0.yaml (every layer trained, linear head, EMA)}, both offline in W&B."""
    root = tmp_path_factory.mktemp("export-runs")
    return {"demo": lite0_run(root / "demo", root / "prepared", "demo.yaml", "train.epochs=2"),
            "finetuned": lite0_run(root / "finetuned", root / "prepared", "finetune_lite0.yaml", "train.epochs=1",
                                   "ema.epochs=0.5", "tta.test=none")}


@pytest.fixture(scope="module")
def reference(runs):
    """predict.py's probabilities (its own pipeline: decode, resize, normalize) of each run on the
    500 test JPEGs."""
    from job.predict import run_probabilities

    return {name: run_probabilities(str(path), TEST_IMAGES, "cpu") for name, path in runs.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny finished run (timm's test_resnet, synthetic data, a linear head): what the refusals
    are tried on."""
    out = tmp_path_factory.mktemp("export-small") / "run"
    run([PYTHON, "job/train.py", *small_run(out, out.parent / "prepared", "train.epochs=1", "model.head_hidden=[]")])
    return out


def export(run_dir: Path, fmt: str, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "job.export", "--run", str(run_dir), "--format", fmt, "--out", str(out), *extra],
               check=check)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_agrees(probs: np.ndarray, ref: tuple[np.ndarray, list[str]]) -> None:
    expected, _ = ref
    assert probs.shape == expected.shape == (500, 10)
    agree = (probs.argmax(axis=1) == expected.argmax(axis=1)).mean()
    assert agree >= 0.99, agree
    assert float(np.abs(probs - expected).max()) <= PREDICT_TOLERANCE


def without_this_project(code: str, tmp_path: Path, blocked=("job", "dali_pipelines")) -> None:
    """Run ``code`` in a fresh interpreter, outside the repository, where importing this project
    (and any module in ``blocked``) fails: what a user elsewhere has."""
    guard = textwrap.dedent(f"""
        import importlib.abc, sys
        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(blocked)!r}:
                    raise ImportError(f"{{name}} is not installed here")
        sys.meta_path.insert(0, Blocked())
        import numpy as np
        from PIL import Image
        images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in {TEST_IMAGES!r}])
    """)
    run([PYTHON, "-I", "-c", guard + textwrap.dedent(code)], cwd=tmp_path)


@pytest.mark.parametrize("name", ["demo", "finetuned"])
def test_onnx_agrees_with_predict_on_real_images(runs, name, tmp_path):
    import onnx
    import onnxruntime

    out = tmp_path / "model.onnx"
    result = result_of(export(runs[name], "onnx", out))
    assert result["exporter"] == "dynamo" and result["max_probability_difference"] <= 1e-4
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    card = RunDir(runs[name]).card()
    assert json.loads(meta["classes"]) == card.classes and int(meta["image_size"]) == SIZE
    assert json.loads(meta["mean"]) == card.mean and json.loads(meta["std"]) == card.std
    assert meta["source_run"] == str(runs[name].resolve()) and meta["job_version"].startswith("0.1.0")
    assert float(meta["source_test_accuracy"]) == RunDir(runs[name]).summary().test_accuracy
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[3] == 3 and all(isinstance(d, str) for d in dims[:3]), dims  # dynamic N, H, W
    # any batch, any size, straight into onnxruntime: probabilities
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(5, 32, 32, 3), (1, 120, 90, 3)]:
        probs = session.run(None, {"images": np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)})[0]
        assert probs.shape == (shape[0], 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # the one-command check of an export against its run: predict.py --run R --onnx F
    proc = run([PYTHON, "job/predict.py", "--run", str(runs[name]), "--onnx", str(out), *TEST_IMAGES])
    check = json.loads(proc.stderr.strip().splitlines()[-1])["onnx_vs_run"]
    assert check["images"] == 500 and check["top1_agree"] >= 495, check
    assert check["max_probability_difference"] <= PREDICT_TOLERANCE, check
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [line["image"] for line in lines] == TEST_IMAGES and all(len(line["top"]) == 5 for line in lines)


@pytest.mark.parametrize("name", ["demo", "finetuned"])
def test_torch_export_loads_without_this_project_and_agrees(runs, reference, name, tmp_path):
    out = tmp_path / "model.pt2"
    assert result_of(export(runs[name], "torch", out))["max_probability_difference"] <= 1e-4
    without_this_project(f"""
        import json, torch
        extra = {{"metadata.json": ""}}
        program = torch.export.load({str(out)!r}, extra_files=extra).module()
        with torch.no_grad():
            probs = program(torch.from_numpy(images))
        np.save("probs.npy", probs.numpy())
        json.dump(json.loads(extra["metadata.json"]), open("meta.json", "w"))
    """, tmp_path, blocked=("job", "dali_pipelines", "timm"))
    assert_agrees(np.load(tmp_path / "probs.npy"), reference[name])
    assert json.loads(json.loads((tmp_path / "meta.json").read_text())["classes"]) == reference[name][1]


def test_timm_loads_the_fine_tuned_run_with_timm_alone(runs, reference, tmp_path):
    """timm.create_model("local-dir:...") with nothing of ours, fed the images as its exported
    pretrained_cfg says (input size, interpolation, mean, std; resized like predict.py, rounded to
    grey levels), gives the run's predictions. (timm's own PIL transform rounds after each of its
    two resize passes: one grey level off on 24% of the pixels at 32 -> 64 px, which moves 11% of
    this barely trained run's top-1 classes.)"""
    out = tmp_path / "timm"
    export(runs["finetuned"], "timm", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    without_this_project(f"""
        import json, timm, torch
        import torch.nn.functional as F
        model = timm.create_model("local-dir:{out}", pretrained=True).eval()
        cfg = model.pretrained_cfg
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
        x = F.interpolate(x, size=cfg["input_size"][1:], mode=cfg["interpolation"], antialias=True).round()
        x = ((x / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        with torch.no_grad():
            probs = model(x.float()).softmax(dim=1)
        np.save("probs.npy", probs.numpy())
        json.dump({{"cfg": {{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std")}},
                   "labels": cfg["label_names"], "num_classes": model.num_classes}}, open("meta.json", "w"))
    """, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    card = RunDir(runs["finetuned"]).card()
    assert meta["num_classes"] == 10 and meta["labels"] == card.classes
    assert meta["cfg"]["input_size"] == [3, SIZE, SIZE] and meta["cfg"]["interpolation"] == "bilinear"
    assert meta["cfg"]["mean"] == pytest.approx(card.mean) and meta["cfg"]["std"] == pytest.approx(card.std)
    assert_agrees(np.load(tmp_path / "probs.npy"), reference["finetuned"])


@pytest.mark.parametrize("name", ["demo", "finetuned"])
def test_each_run_logged_best_as_a_model_artifact_once(runs, name):
    run_dir = RunDir(runs[name])
    files = sorted(run_dir.wandb.glob("offline-run-*/run-*.wandb"))
    artifacts = [r.artifact for f in files for r in records(f) if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.type == "model"]
    assert len(artifacts) == 1, [a.name for a in artifacts]
    summary = run_dir.summary()
    step = next(r.step for r in run_dir.epochs() if r.epoch == summary.best_epoch)
    assert artifacts[0].name == f"model-{files[0].stem[4:]}" and {"best", f"step-{step}"} <= set(artifacts[0].aliases)
    meta = json.loads(artifacts[0].metadata)
    assert meta["test_accuracy"] == summary.test_accuracy and meta["card"] == json.loads(run_dir.card_file.read_text())
    assert sorted(m.path for m in artifacts[0].manifest.contents) == ["model.json", "model.safetensors"]


def test_a_head_timm_cannot_take_is_refused_and_nothing_written(runs, tmp_path):
    out = tmp_path / "new" / "timm"
    proc = export(runs["demo"], "timm", out, check=False)
    assert_refused(proc, "[1024, 512, 256]", "cannot express", "--format onnx or --format torch")
    assert not (tmp_path / "new").exists()


def test_refusals_exit_2_and_write_nothing(small, tmp_path):
    import shutil

    # a run without best/
    no_best = tmp_path / "no-best"
    shutil.copytree(small, no_best)
    shutil.rmtree(no_best / "best")
    assert_refused(export(no_best, "onnx", tmp_path / "a.onnx", check=False), "best/model.safetensors", "not found")
    # a damaged weights file
    damaged = tmp_path / "damaged"
    shutil.copytree(small, damaged)
    weights = RunDir(damaged).weights_file
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_refused(export(damaged, "torch", tmp_path / "a.pt2", check=False), str(weights), "damaged or truncated")
    # a damaged card
    RunDir(damaged).card_file.write_text("{not json")
    assert_refused(export(damaged, "onnx", tmp_path / "a.onnx", check=False), "model.json", "not a model card")
    assert_refused(export(tmp_path / "nowhere", "onnx", tmp_path / "a.onnx", check=False), "no such directory")
    assert_refused(export(small, "torch", tmp_path / "model.bin", check=False), "ending in .pt2")
    # --wandb for a run that did not log to W&B: refused before anything is written
    assert_refused(export(small, "onnx", tmp_path / "a.onnx", "--wandb", check=False), "no W&B run",
                   "without --wandb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "no-best"]


def test_an_existing_out_is_replaced_only_with_force(small, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    assert_refused(export(small, "onnx", out, check=False), str(out), "exists", "--force")
    assert out.read_bytes() == b"the user's file"
    folder = tmp_path / "timm"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert_refused(export(small, "timm", folder, "--force", check=False), "not a timm export of this job")
    assert snapshot(tmp_path) == before
    # --force: replaced by a complete, verified file, with no temporary left beside it
    proc = export(small, "onnx", out, "--force")
    assert "max probability difference" in proc.stderr and out.read_bytes()[:20] != b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "timm"]


def test_predict_refuses_an_onnx_file_that_is_not_an_export(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    proc = run([PYTHON, "job/predict.py", "--onnx", str(bogus), TEST_IMAGES[0]], check=False)
    assert_refused(proc, str(bogus), "not a readable ONNX model")
    proc = run([PYTHON, "job/predict.py", TEST_IMAGES[0]], check=False)
    assert proc.returncode == 2 and "give --run DIR, --onnx FILE, or both" in proc.stderr


def test_the_torchscript_exporter_takes_over_when_dynamo_fails(small, tmp_path, monkeypatch):
    import onnx
    import torch

    from job import export as export_module

    real = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo cannot trace this model")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    said = []
    result = export_module.export(small, "onnx", tmp_path / "model.onnx", say=said.append)
    assert result["exporter"] == "torchscript" and result["max_probability_difference"] <= 1e-4
    assert "dynamo cannot trace this model" in said[0] and "TorchScript" in said[0]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert meta["exporter"] == "torchscript" and json.loads(meta["classes"])[0] == "airplane"


@pytest.mark.parametrize("fmt", ["onnx", "torch", "timm"])
def test_an_export_that_disagrees_with_pytorch_is_refused_and_not_written(small, tmp_path, monkeypatch, fmt):
    from job import export as export_module

    # timm: the head checks (before writing, and again inside) pass; the model loaded back disagrees
    differences = iter([0.0, 0.0, 0.5] if fmt == "timm" else [0.5])
    monkeypatch.setattr(export_module, "_max_difference", lambda pairs: next(differences))
    out = tmp_path / "exports" / {"onnx": "model.onnx", "torch": "model.pt2", "timm": "timm"}[fmt]
    with pytest.raises(export_module.ExportError, match="by 0.5 in probability"):
        export_module.export(small, fmt, out, say=lambda line: None)
    assert not (tmp_path / "exports").exists()


def test_importing_the_export_module_loads_no_onnx_package():
    proc = run([PYTHON, "-c", "import sys, job.export, job.predict; "
                "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript')))"])
    assert proc.stdout.strip() == "[]"
