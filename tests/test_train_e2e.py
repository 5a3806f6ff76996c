"""The real entry points end to end on CPU: train, evaluate, predict, 2 processes, SIGTERM + resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.runs import FOLDER_MINI, PYTHON, accelerate_launch, assert_refused, run, small_run, train_until_sigterm
from job.distributed import cpu_bf16_features
from job.run_dir import RunDir

pytestmark = pytest.mark.slow


def cifar_run(out: Path, prepared: Path, *extra: str) -> list[str]:
    """The small run on the real CIFAR-10 sample (1,800 train / 200 val / 1,000 test), 64 images
    per batch: 29 batches per epoch."""
    return small_run(out, prepared, "data.batch_size=64", "model.head_hidden=[64]", "train.log_every=5", *extra,
                     data="cifar10")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    out = tmp_path_factory.mktemp("run") / "cifar"
    run([PYTHON, "job/train.py", *cifar_run(out, prepared, "train.epochs=8", "early_stopping.patience=0")])
    return out


def test_learns_well_above_chance_and_writes_every_output(trained):
    run_dir = RunDir(trained)
    m = run_dir.summary()
    assert m.test_accuracy > 0.30, m.test_accuracy  # chance is 0.10; ~0.45 measured
    assert m.test_samples == 1000 and m.world_size == 1 and m.epochs_completed == 8
    assert not m.stopped_early and m.train_images_per_second > 0
    assert sum(sum(row) for row in m.confusion_matrix) == 1000
    history = run_dir.epochs()
    assert [h.epoch for h in history] == list(range(8))
    for key in ("lr", "train_loss", "val_loss", "val_accuracy", "epoch_seconds", "images_per_second"):
        assert all(hasattr(h, key) for h in history)
    assert all(h.val_samples == 200 and h.train_samples == 1800 for h in history)
    assert m.best_val_accuracy == max(h.val_accuracy for h in history)
    assert m.best_epoch == max(range(8), key=lambda e: (history[e].val_accuracy, -e))
    assert history[-1].train_loss < history[0].train_loss
    assert run_dir.config_file.is_file() and run_dir.weights_file.is_file()
    meta = run_dir.card()
    assert meta.epoch == m.best_epoch and meta.classes[0] == "airplane"
    checkpoints = sorted(run_dir.checkpoints.iterdir())
    assert [c.name for c in checkpoints] == ["epoch0007-step0000203", "epoch0008-step0000232"]  # keep 2
    assert (checkpoints[-1] / "config.yaml").read_text() == run_dir.config_file.read_text()


def test_evaluate_gives_identical_results_on_1_and_2_processes(trained):
    one = json.loads(run([PYTHON, "job/evaluate.py", "--run", str(trained), "--tta", "flip"])
                     .stdout.strip().splitlines()[-1])
    two = json.loads(run(accelerate_launch(2, "job/evaluate.py", "--run", str(trained), "--batch-size", "48",
                                           "--tta", "flip")).stdout.strip().splitlines()[-1])
    assert one["samples"] == two["samples"] == 1000 and two["world_size"] == 2
    assert one["accuracy"] == two["accuracy"] == RunDir(trained).summary().test_accuracy
    assert one["accuracy_tta"] == two["accuracy_tta"] != one["accuracy"]  # beside it, exact on any world size
    assert one["per_class_accuracy"] == two["per_class_accuracy"]
    val = json.loads(run([PYTHON, "job/evaluate.py", "--run", str(trained), "--split", "val"]).stdout.splitlines()[-1])
    assert val["samples"] == 200


def test_evaluate_reads_the_data_where_it_is_mounted_now(trained, prepared, tmp_path):
    """best/model.json holds no store path: a run evaluates against the same data mounted
    elsewhere (another pod, another machine) with --store."""
    import shutil

    moved = tmp_path / "mounted-elsewhere" / "cifar10"
    shutil.copytree(prepared / "cifar10", moved)
    assert str(prepared) not in RunDir(trained).card_file.read_text()
    result = json.loads(run([PYTHON, "job/evaluate.py", "--run", str(trained), "--store", str(moved)])
                        .stdout.splitlines()[-1])
    assert result["samples"] == 1000 and result["accuracy"] == RunDir(trained).summary().test_accuracy


def test_predict_prints_top5_for_image_files(trained):
    images = [sorted((FOLDER_MINI / "test" / c).iterdir())[0] for c in ("cat", "ship")]
    lines = run([PYTHON, "job/predict.py", "--run", str(trained), *map(str, images)]).stdout.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images):
        result = json.loads(line)
        probs = [t["probability"] for t in result["top"]]
        assert result["image"] == str(image) and len(probs) == 5
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(t["class"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck") for t in result["top"])
    bad = run([PYTHON, "job/predict.py", "--run", str(trained), "/nope.jpg"], check=False)
    assert bad.returncode == 2 and "/nope.jpg: no such file" in bad.stderr


@pytest.mark.skipif(not cpu_bf16_features(), reason="bf16 on CPU is refused where the CPU has no native bf16")
def test_folder_source_bf16_channels_last_and_accumulation(tmp_path):
    """Your own JPEG folders end to end, with the mixed-precision / memory-format / accumulation
    branches a GPU run takes (bf16 autocast and channels_last also run on CPU)."""
    out = tmp_path / "folder"
    run([PYTHON, "job/train.py", *cifar_run(out, tmp_path / "prep", "data.source=folder", f"data.root={FOLDER_MINI}",
                                            "train.epochs=1", "train.mixed_precision=bf16",
                                            "train.channels_last=true", "train.grad_accum_steps=2",
                                            "train.strategy=feature_extraction", "data.batch_size=32")])
    m = RunDir(out).summary()
    assert m.test_samples == 500 and m.epochs_completed == 1
    history = RunDir(out).epochs()[0]
    assert history.train_samples == 900 and history.val_samples == 100
    assert history.step == 15  # 29 batches of 32 (the last one 4), 2 per optimizer update


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, prepared):
    common = ("train.epochs=2", "train.log_every=1", "train.signal_check_every=1", "early_stopping.patience=0")
    reference = tmp_path / "reference"
    run([PYTHON, "job/train.py", *cifar_run(reference, prepared, *common)])
    resumed = tmp_path / "resumed"
    args = cifar_run(resumed, prepared, *common, "tracking.wandb=offline")
    code, _ = train_until_sigterm([PYTHON, "job/train.py", *args], at_line="step 40:")
    assert code == 143  # 29 batches/epoch: mid epoch 2
    checkpoints = sorted(p.name for p in RunDir(resumed).checkpoints.iterdir())
    # The signal lands at step 40 or a step or two later: the checkpoint is mid epoch 2 (steps 30-58).
    step = int(checkpoints[-1].split("step")[1])
    assert checkpoints[-1].startswith("epoch0001-") and 40 <= step < 58, checkpoints
    assert not RunDir(resumed).summary_file.exists()
    out = run([PYTHON, "job/train.py", *args]).stdout
    assert "resumed from" in out and f"epoch 2, sample {(step - 29) * 64}" in out  # shown 1-based
    ref_hist = RunDir(reference).epochs()
    res_hist = RunDir(resumed).epochs()
    assert [h.epoch for h in res_hist] == [0, 1]
    for a, b in zip(ref_hist, res_hist):
        for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "step", "train_samples"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-6, abs=1e-9), key
    ref_m = RunDir(reference).summary()
    res_m = RunDir(resumed).summary()
    for key in ("test_accuracy", "test_samples", "best_epoch", "best_val_accuracy", "epochs_completed"):
        assert getattr(res_m, key) == getattr(ref_m, key), key
    # W&B: one offline run directory per process start, both writing the same run id.
    runs = sorted(RunDir(resumed).wandb.glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name


def test_bad_config_and_data_exit_2_with_a_message(tmp_path):
    proc = run([PYTHON, "job/train.py", "--config", "job/configs/demo.yaml", "train.strategy=bogus"], check=False)
    assert proc.returncode == 2 and "choose one of feature_extraction, finetune, two_stage" in proc.stderr
    (tmp_path / "data").mkdir()
    proc = run([PYTHON, "job/train.py", "--config", "job/configs/demo.yaml", "data.source=folder",
                f"data.root={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'o'}"], check=False)
    assert proc.returncode == 2 and "missing train/ folder" in proc.stderr
    assert not (tmp_path / "o").exists()
    # accelerate launch loses the code (exit 1, CalledProcessError): job/train.py's last line says it
    assert proc.stderr.strip().splitlines()[-1] == ("job/train.py: exit code 2: bad config, data or weights; nothing "
                                                    "was trained. Fix what the error above names: retrying cannot help")


def test_a_crash_ends_with_its_traceback_then_the_code_it_means(tmp_path):
    """A crash (here: the first step of fit() raises) is exit 1: the traceback, then the last line
    saying what 1 means."""
    from job.preemption import exit_line

    crash = ("import runpy, sys; import job.checkpoint; job.checkpoint.check_resume = lambda cfg: 1 / 0; "
             f"sys.argv = ['job/train.py', '--config', 'tests/configs/small.yaml', 'train.output_dir={tmp_path}']; "
             "runpy.run_path('job/train.py', run_name='__main__')")
    proc = run([PYTHON, "-c", crash], check=False)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == exit_line(1)
    assert exit_line(143).startswith("job/train.py: exit code 143: preempted")


def test_an_altered_checkpoint_is_refused_not_unpickled(tmp_path, prepared, trained):
    """Accelerate reads the optimizer with torch.load(weights_only=True): a checkpoint whose
    optimizer.bin would run code is refused with exit 2 and the checkpoint named."""
    import os
    import pickle
    import shutil

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    checkpoint = tmp_path / "epoch0008-step0000232"
    shutil.copytree(sorted(RunDir(trained).checkpoints.iterdir())[-1], checkpoint)
    good_config = (checkpoint / "config.yaml").read_text()
    (checkpoint / "config.yaml").write_text("model: [unbalanced\n")
    proc = run([PYTHON, "job/train.py", *cifar_run(tmp_path / "out", prepared, "train.epochs=9",
                                                   f"train.resume={checkpoint}")], check=False)
    assert_refused(proc, str(checkpoint / "config.yaml"), "not a config this job wrote")
    (checkpoint / "config.yaml").write_text(good_config)
    with open(checkpoint / "optimizer.bin", "wb") as f:
        pickle.dump({"state": Exploit()}, f)
    proc = run([PYTHON, "job/train.py", *cifar_run(tmp_path / "out", prepared, "train.epochs=9",
                                                   f"train.resume={checkpoint}")], check=False)
    assert_refused(proc, str(checkpoint), "cannot restore this checkpoint", "train.resume=never")
    assert not (tmp_path / "PWNED").exists()


def test_resuming_under_another_model_or_input_size_is_refused(trained):
    """train.resume=auto finds the run's checkpoint; with another head or input size it would
    continue a different experiment (here: `make demo` after editing its config)."""
    before = sorted(p.name for p in trained.rglob("*"))
    for override, key in (("model.head_hidden=[32]", "model.head_hidden"), ("data.image_size=40", "data.image_size")):
        proc = run([PYTHON, "job/train.py", *cifar_run(trained, trained.parent / "prep-other", "train.epochs=9",
                                                       override)], check=False)
        assert_refused(proc, "checkpoints/epoch0008-step0000232 was written with", f"{key}=", "train.resume=never")
    assert sorted(p.name for p in trained.rglob("*")) == before
