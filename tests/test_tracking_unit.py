"""Tracking decisions that need no run: mode resolution, failure isolation."""
import types

from job import tracking
from job.config import load_config
from job.records import EpochRecord
from job.run_dir import RunDir


def test_auto_mode_follows_the_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("disabled") == "disabled"


def test_sweep_runs_get_their_own_output_dir(monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert load_config(None, ["train.output_dir=runs/sweep"]).train.output_dir == "runs/sweep"
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert load_config(None, ["train.output_dir=runs/sweep"]).train.output_dir == "runs/sweep/abc123"


def test_a_failing_wandb_call_is_reported_once_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789")
    printed, calls = [], []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise OSError("No space left on device (key secret-key-0123456789)")

    sink = tracking.WandbSink(types.SimpleNamespace(log=broken_log), tmp_path, printed.append)
    history = tracking.HistorySink(RunDir(tmp_path))
    sink.log_step({"train/loss": 1.0}, step=1)
    sink.log_step({"train/loss": 0.9}, step=2)
    record = EpochRecord(epoch=0, step=2, lr=0.1, train_loss=1.0, train_accuracy=0.4, train_samples=8,
                         epoch_seconds=1.0, images_per_second=10.0, images_per_second_per_device=10.0,
                         data_wait_fraction=0.0, val_loss=1.0, val_accuracy=0.5, val_samples=4)
    history.append(record)
    sink.log_epoch(record)
    assert len(calls) == 1 and sink.wandb is None
    assert len(printed) == 1 and "No space left on device" in printed[0] and "W&B is off" in printed[0]
    assert "secret-key" not in printed[0] and "***" in printed[0]  # the API key never reaches a log
    assert history.records() == [record]  # the local history still got the epoch
