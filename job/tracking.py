"""Where metrics go: ``history.jsonl`` and PNG plots in the output directory always, Weights &
Biases when enabled. Only the main process writes; every method is a no-op on the others.

W&B failures after start-up never stop training: the first error is reported, W&B is switched
off for the rest of the run, and everything stays in the output directory.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import string
import subprocess
import sys
from pathlib import Path

from accelerate import Accelerator

from job.config import Config, TrackingConfig


class TrackingError(RuntimeError):
    """W&B cannot start in the mode asked for; the message says what to do."""


def resolve_mode(mode: str) -> str:
    """``auto`` = online when an API key is available (env or ``wandb login``), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        hosts = netrc.netrc().hosts
        if any("wandb" in host for host in hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def sweep_output_dir(output_dir: str) -> str:
    """Inside a W&B sweep every run gets its own directory under ``output_dir``."""
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        return str(Path(output_dir) / run_id)
    return output_dir


def run_facts(accelerator: Accelerator) -> dict:
    """World size, nodes, hardware, library versions and git commit, for the run's config."""
    import timm
    import torch

    # torchrun (under accelerate launch) sets LOCAL_WORLD_SIZE = processes on this node.
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    facts = {"world_size": accelerator.num_processes, "nodes": accelerator.num_processes // max(per_node, 1),
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
             "gpus_per_node": torch.cuda.device_count(), "python": sys.version.split()[0],
             "torch": torch.__version__, "timm": timm.__version__}
    for name in ("accelerate", "nvidia.dali", "wandb"):
        try:
            facts[name.split(".")[-1]] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            pass
    try:
        facts["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                             timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["git_commit"] = None
    return facts


def _new_run_id() -> str:
    """8 lowercase letters/digits, like W&B's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Tracker:
    def __init__(self, accelerator: Accelerator, cfg: Config, output_dir: str | Path, *, start_epoch: int,
                 run_id: str | None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.history_path = self.output_dir / "history.jsonl"
        self.mode = resolve_mode(cfg.tracking.wandb)
        self.wandb = None  # the module, once a run is live
        self.run_id = run_id
        if not accelerator.is_main_process:
            return
        self._truncate_history(start_epoch)
        if self.mode != "disabled":
            self._start_wandb(cfg, cfg.tracking, accelerator)

    # ---- W&B life cycle -----------------------------------------------------------------
    def _start_wandb(self, cfg: Config, tc: TrackingConfig, accelerator: Accelerator) -> None:
        import wandb

        self.run_id = self.run_id or os.environ.get("WANDB_RUN_ID") or _new_run_id()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=tc.project, entity=tc.entity, name=tc.run_name, group=tc.group,
                             tags=tc.tags or None, id=self.run_id, resume="allow", mode=self.mode,
                             dir=str(self.output_dir), config={**cfg.to_dict(), "run": run_facts(accelerator)},
                             settings=wandb.Settings(console="off", silent=True))  # WANDB_INIT_TIMEOUT applies
        except Exception as e:  # noqa: BLE001 - wandb raises many types for auth/network/disk problems
            hint = ("check WANDB_API_KEY (wandb.ai/authorize) and network access to the W&B server, or use "
                    "tracking.wandb=offline and `wandb sync` later" if self.mode == "online" else
                    "check free space and write permission in the output directory, or tracking.wandb=disabled")
            raise TrackingError(f"W&B could not start in {self.mode} mode ({type(e).__name__}: {e}); {hint}") from None
        run.define_metric("epoch")
        run.define_metric("val/*", step_metric="epoch")
        run.define_metric("epoch/*", step_metric="epoch")
        run.define_metric("val/accuracy", step_metric="epoch", summary="max")
        run.define_metric("val/loss", step_metric="epoch", summary="min")
        self.wandb = wandb
        where = f"offline, in {Path(run.dir).parent}; upload with `wandb sync {Path(run.dir).parent}`" \
            if self.mode == "offline" else run.get_url()
        accelerator.print(f"W&B run {self.run_id} ({where})")

    def _safely(self, what: str, fn) -> None:
        """Run a W&B call; on failure warn once and keep training without W&B."""
        if self.wandb is None:
            return
        try:
            fn(self.wandb)
        except Exception as e:  # noqa: BLE001
            self.accelerator.print(f"warning: W&B {what} failed ({type(e).__name__}: {e}); W&B is off for the "
                                   f"rest of this run, results stay in {self.output_dir}")
            self.wandb = None

    # ---- history ------------------------------------------------------------------------
    def _truncate_history(self, start_epoch: int) -> None:
        """On resume, drop lines of epochs that will run again (written after the last checkpoint)."""
        if not self.history_path.exists():
            return
        kept = [line for line in self.history_path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] < start_epoch]
        self.history_path.write_text("".join(line + "\n" for line in kept))

    def history(self) -> list[dict]:
        if not self.history_path.exists():
            return []
        return [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]

    # ---- logging --------------------------------------------------------------------------
    def log_step(self, metrics: dict, step: int) -> None:
        if self.accelerator.is_main_process:
            self._safely("log", lambda wandb: wandb.log(metrics, step=step))

    def log_epoch(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        payload = {"epoch": record["epoch"] + 1, "val/accuracy": record["val_accuracy"], "val/loss": record["val_loss"],
                   "epoch/train_loss": record["train_loss"], "epoch/train_accuracy": record["train_accuracy"],
                   "epoch/lr": record["lr"], "epoch/seconds": record["epoch_seconds"],
                   "epoch/images_per_second": record["images_per_second"],
                   "epoch/data_wait_fraction": record["data_wait_fraction"]}
        self._safely("log", lambda wandb: wandb.log(payload, step=record["step"]))

    def finish(self, metrics: dict, samples: list[dict] | None = None) -> None:
        """Final metrics, plots, confusion matrix, sample predictions and the best model."""
        if not self.accelerator.is_main_process:
            return
        from job.plots import plot_confusion_matrix, plot_curves, plot_samples

        history = self.history()
        plot_curves(history, self.output_dir / "curves.png")
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"], self.output_dir / "confusion_matrix.png")
        if samples:
            plot_samples(samples, self.output_dir / "test_samples.png")
        self._safely("summary", lambda wandb: self._log_final(wandb, metrics, samples or []))
        self._safely("finish", lambda wandb: wandb.finish())

    def _log_final(self, wandb, metrics: dict, samples: list[dict]) -> None:
        run = wandb.run
        for key in ("test_accuracy", "test_loss", "test_samples", "best_val_accuracy", "best_epoch",
                    "epochs_completed", "stopped_early", "world_size", "train_images_per_second",
                    "train_images_per_second_per_device", "data_wait_fraction"):
            run.summary[key] = metrics[key]
        classes, confusion = metrics["classes"], metrics["confusion_matrix"]
        per_class = wandb.Table(columns=["class", "accuracy"],
                                data=[[c, metrics["test_per_class_accuracy"][c]] for c in classes])
        y_true = [t for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
        preds = [p for t, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
        payload = {"test/per_class_accuracy": per_class,
                   "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=classes),
                   "plots/curves": wandb.Image(str(self.output_dir / "curves.png"))}
        if samples:
            payload["test/samples"] = [wandb.Image(s["image"], caption=f"pred: {s['pred']} / true: {s['true']}")
                                       for s in samples]
        run.log(payload)
        best = self.output_dir / "best"
        if best.is_dir() and sum(f.stat().st_size for f in best.iterdir()) < 2 * 1024**3:
            artifact = wandb.Artifact(f"model-{self.run_id}", type="model",
                                      metadata={k: metrics[k] for k in ("test_accuracy", "best_epoch")})
            artifact.add_dir(str(best))
            run.log_artifact(artifact, aliases=["best", "latest"])
