"""RunDir: a run folder written by the job's own writers reads back typed, and a damaged file is a
refusal naming it."""
from __future__ import annotations

import dataclasses
import re

import pytest
from accelerate import Accelerator

from helpers.runs import REPO
from job.checkpoint import save_best
from job.config import ConfigError, load_config
from job.loop import EpochSums
from job.card import ModelCard
from job.model import WeightsError, create_model
from job.records import EpochRecord, RunSummary
from job.run_dir import RunDir, load_trained
from job.tracking import Trackers, summary_scalars

CLASSES = ["cat", "ship"]


def epoch_record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=4 * (epoch + 1), lr=0.1, train_loss=1.0 - epoch / 10, train_accuracy=0.5,
                       train_samples=32, epoch_seconds=2.0, images_per_second=16.0,
                       images_per_second_per_device=16.0, data_wait_fraction=0.25, val_loss=0.9,
                       val_accuracy=0.5 + epoch / 10, val_samples=8, steady_images_per_second=20.0)


def run_summary() -> RunSummary:
    return RunSummary(test_accuracy=0.75, test_loss=0.5, test_samples=8,
                      test_per_class_accuracy={"cat": 0.5, "ship": 1.0}, best_val_accuracy=0.6, best_epoch=1,
                      epochs_completed=2, stopped_early=False, world_size=1, global_steps=8,
                      train_images_per_second=16.0, train_images_per_second_per_device=16.0,
                      data_wait_fraction=0.25, confusion_matrix=[[2, 2], [0, 4]], classes=CLASSES,
                      train_images_per_second_steady=20.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A finished run's folder, written by Config.save, Trackers and save_best as train.py calls them."""
    run = RunDir(tmp_path_factory.mktemp("runs") / "tiny")
    cfg = load_config(REPO / "tests" / "configs" / "small.yaml",
                      [f"train.output_dir={run.path}", "tracking.wandb=disabled"])
    accelerator = Accelerator(cpu=True)
    run.path.mkdir()
    cfg.save(run.config_file)
    trackers = Trackers(accelerator, cfg, run.path, start_epoch=0, run_id=None)
    for epoch in range(2):
        trackers.log_epoch(epoch_record(epoch))
    model, prep = create_model(cfg.model, len(CLASSES))
    card = ModelCard.for_run(cfg.model, prep, CLASSES)
    save_best(accelerator, model.state_dict(), run.path, card)
    trackers.finish(run_summary(), samples=[])
    return run, cfg, card


def test_every_file_reads_back_typed(written):
    run, cfg, card = written
    assert run.config() == cfg
    assert run.epochs() == [epoch_record(0), epoch_record(1)]
    assert run.summary() == run_summary()
    assert run.card() == card
    model, loaded = load_trained(run)
    assert loaded == card and model.head is not None
    assert run.is_ours() and RunDir(run.path.parent).is_ours() is False
    named = [run.config_file, run.history_file, run.summary_file, run.weights_file, run.card_file, run.curves_png,
             run.confusion_png]
    assert all(p.is_file() for p in named)
    assert sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(run.path).as_posix() for p in named)  # every file the writers made has a name here


def test_a_damaged_file_is_refused_by_name(written, tmp_path):
    import shutil

    run = RunDir(tmp_path / "copy")
    shutil.copytree(written[0].path, run.path)
    run.summary_file.write_text('{"test_accuracy": 0.5}')
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.summary_file))} is not a run summary of this job"):
        run.summary()
    run.summary_file.unlink()
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.summary_file))} not found"):
        run.summary()
    run.history_file.write_text(run.history_file.read_text() + '{"when": "yesterday"}\n')
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.history_file))}: line 3 is not an epoch record"):
        run.epochs()
    run.card_file.write_text('{"model": "no_such_net"}')
    with pytest.raises(WeightsError, match=f"{re.escape(str(run.card_file))} is not a model card of this job"):
        run.card()
    run.config_file.write_text("")
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.config_file))} must be a mapping"):
        run.config()
    run.config_file.write_text("model:\n  colour: blue\n")
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\) model.colour.*{re.escape(f'(in {run.config_file})')}"):
        run.config()


def test_epoch_sums_give_exactly_the_training_fields_of_a_record():
    # train.py builds the record as EpochRecord(epoch=, step=, lr=, **sums.metrics(world_size), val_*=)
    assert tuple(EpochSums().metrics(world_size=2)) == EpochRecord.train_fields()
    assert set(EpochRecord.train_fields()) | {"epoch", "step", "lr", "val_loss", "val_accuracy", "val_samples",
                                             "val_accuracy_ema"} == \
        {f.name for f in dataclasses.fields(EpochRecord)}


def test_the_wandb_summary_is_every_single_value_of_the_run_summary():
    values = summary_scalars(run_summary())
    lists = {"test_per_class_accuracy", "confusion_matrix", "classes"}  # a W&B table and a plot instead
    assert set(values) == {f.name for f in dataclasses.fields(RunSummary)} - lists
    assert values["test_accuracy"] == 0.75 and values["best_epoch"] == 1 and values["replicas_identical"] is None


def test_compare_reads_finished_runs_through_run_dir(written):
    from job.reporting import compare_runs

    run, _, _ = written
    assert compare_runs([run.path]).splitlines()[-1].split()[1:] == ["test_resnet", "(random)", "0.750", "on", "8"]


def test_only_what_this_job_writes_is_read_as_ours(written, tmp_path):
    """No compatibility paths for files never released: a card with a key this job does not
    write, a head this job does not build, a config.yaml without the job's header."""
    import json
    import shutil

    run = RunDir(tmp_path / "copy")
    shutil.copytree(written[0].path, run.path)
    fields = json.loads(run.card_file.read_text())
    run.card_file.write_text(json.dumps({**fields, "top5": 0.9}))
    with pytest.raises(WeightsError, match="is not a model card of this job.*top5"):
        run.card()
    run.card_file.write_text(json.dumps({**fields, "head_activation": "gelu"}))
    with pytest.raises(WeightsError, match="head_activation 'gelu' is not 'relu'"):
        run.card()
    run.card_file.write_text(json.dumps(fields))
    assert run.card() == written[2] and run.is_ours()
    run.config_file.write_text(run.config_file.read_text().split("\n", 1)[1])  # all of it but the header
    assert run.is_ours() is False


def test_the_output_dir_check_refuses_the_best_folders_that_save_best_would_refuse(tmp_path):
    """check_output_dir (at start) and save_best's atomic_directory (after training) apply one rule."""
    from job.atomic import foreign
    from job.storage import check_output_dir

    from job.config import CONFIG_HEADER

    run = RunDir(tmp_path / "out")
    run.best.mkdir(parents=True)
    run.config_file.write_text(CONFIG_HEADER + "\n")  # a run of ours
    check_output_dir(run.path)  # an empty best/ is fine
    (run.best / RunDir.CARD).write_text("{}")
    check_output_dir(run.path)  # so is one of ours
    elsewhere = tmp_path / "elsewhere"
    run.best.rename(elsewhere)
    run.best.symlink_to(elsewhere, target_is_directory=True)
    assert foreign(run.best, RunDir.is_best) == "exists and is not a directory"
    with pytest.raises(ConfigError, match=f"{re.escape(str(run.best))} exists and was not written by this job"):
        check_output_dir(run.path)
    run.best.unlink()
    run.best.mkdir()
    (run.best / "notes.txt").write_text("mine")
    assert foreign(run.best, RunDir.is_best) == "is a non-empty directory that this job did not write"
    with pytest.raises(ConfigError, match="was not written by this job"):
        check_output_dir(run.path)
