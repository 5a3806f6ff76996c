"""Tracking decisions that need no run: mode resolution, failure isolation."""
import types

from job import tracking


def test_auto_mode_follows_the_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("disabled") == "disabled"


def test_sweep_runs_get_their_own_output_dir(monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert tracking.sweep_output_dir("runs/sweep") == "runs/sweep"
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert tracking.sweep_output_dir("runs/sweep") == "runs/sweep/abc123"


def test_a_failing_wandb_call_is_reported_once_and_training_goes_on(tmp_path):
    printed = []
    tracker = tracking.Tracker.__new__(tracking.Tracker)
    tracker.accelerator = types.SimpleNamespace(is_main_process=True, print=printed.append)
    tracker.output_dir, tracker.history_path = tmp_path, tmp_path / "history.jsonl"
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise OSError("No space left on device")

    tracker.wandb = types.SimpleNamespace(log=broken_log)
    tracker.log_step({"train/loss": 1.0}, step=1)
    tracker.log_step({"train/loss": 0.9}, step=2)
    tracker.log_epoch({"epoch": 0, "step": 2, "val_accuracy": 0.5, "val_loss": 1.0, "train_loss": 1.0,
                       "train_accuracy": 0.4, "lr": 0.1, "epoch_seconds": 1.0, "images_per_second": 10.0,
                       "data_wait_fraction": 0.0})
    assert len(calls) == 1 and tracker.wandb is None
    assert len(printed) == 1 and "No space left on device" in printed[0] and "W&B is off" in printed[0]
    assert tracker.history()[0]["val_accuracy"] == 0.5  # the local history still got the epoch
