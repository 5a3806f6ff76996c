"""The training job refuses what cannot train, early and clearly: exit code 2, the path or value
and the fix named, no traceback, nothing written."""
from __future__ import annotations

import pickle

import pytest

from helpers.runs import PYTHON, assert_refused, run, small_run
from job.run_dir import RunDir



def train_args(tmp_path, *overrides: str) -> list[str]:
    return small_run(tmp_path / "out", tmp_path / "prep", "data.synthetic_train=200", "data.synthetic_test=50",
                     *overrides)


def train(tmp_path, *overrides: str, env: dict | None = None):
    return run([PYTHON, "job/train.py", *train_args(tmp_path, *overrides)], check=False, env=env)


def test_refusals_before_any_work(tmp_path, capsys):
    """Config-level problems: found before data, model or output directory are touched (run
    in-process: main() returns before it builds anything)."""
    from job.train import main

    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    not_a_checkpoint = tmp_path / "some-folder"
    not_a_checkpoint.mkdir()
    cases = [
        ((f"train.output_dir={a_file}",), (str(a_file), "is not a directory")),
        ((f"train.output_dir={a_file / 'sub'}",), ("which is a file",)),
        ((f"train.resume={not_a_checkpoint}",), (str(not_a_checkpoint), "not a checkpoint written by this job")),
        (("train.seed=-1",), ("train.seed must be >= 0",)),
        (("data.split_seed=-5",), ("data.split_seed",)),
        (("data.val_fraction=0",), ("training needs a validation split",)),
        (("features.cache=true", "train.strategy=finetune"), ("needs train.strategy=feature_extraction",)),
        ((f"data.root={tmp_path}", "data.source=cifar10"), ("overlaps data.root", "outside data.root")),
        ((f"data.root={tmp_path / 'prep' / 'cifar10' / 'x'}", "data.source=cifar10"), ("overlaps data.root",)),
    ]
    for overrides, needles in cases:
        code = main(train_args(tmp_path, *overrides))
        err = capsys.readouterr().err
        assert code == 2 and all(n in err for n in needles), (overrides, err)
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt", "some-folder"]  # nothing written


def test_an_output_dir_this_job_cannot_use(tmp_path, capsys, monkeypatch):
    """A best/ the job did not write would be replaced: refused; an unwritable output_dir is
    refused before any work (checked with os.access, patched here: root may write anywhere)."""
    from job import storage
    from job import train as train_module

    foreign = RunDir(tmp_path / "out").best
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert train_module.main(train_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "was not written by this job" in err
    assert (foreign / "notes.txt").read_text() == "mine"
    monkeypatch.setattr(storage.os, "access", lambda path, mode: False)
    assert train_module.main(train_args(tmp_path, f"train.output_dir={tmp_path / 'elsewhere'}")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not writable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_an_image_size_the_architecture_cannot_take(tmp_path):
    proc = train(tmp_path, "model.name=inception_resnet_v2", "data.image_size=40", "model.head_hidden=[8]")
    assert_refused(proc, "data.image_size=40 is too small for inception_resnet_v2", "its pretrained size is 299")
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_weights_that_need_full_unpickling_or_fit_another_model_are_refused(tmp_path):
    import timm
    import torch

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": _Exploit(marker)}, f)
    proc = train(tmp_path, "model.pretrained=true", f"model.weights={evil}")
    assert_refused(proc, str(evil), "safetensors")
    assert not marker.exists()
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    proc = train(tmp_path, "model.pretrained=true", f"model.weights={other}")
    assert_refused(proc, str(other), "test_resnet")
    fake = tmp_path / "fake.safetensors"
    fake.write_text("these are not weights\n")
    proc = train(tmp_path, "model.pretrained=true", f"model.weights={fake}")
    assert_refused(proc, str(fake))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_wandb_server_that_cannot_be_reached_is_a_clear_error_without_the_key(tmp_path):
    """(tests/test_tracking.py checks that an offline run writes the key nowhere.)"""
    key = "fake0wandb0key0" + "7" * 25
    proc = train(tmp_path, "tracking.wandb=online", "train.epochs=1",
                 env={"WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "8"})
    assert_refused(proc, "W&B could not start in online mode", "tracking.wandb=offline")
    assert key not in proc.stdout + proc.stderr
