"""Where metrics go: ``history.jsonl`` always (``HistorySink``), Weights & Biases when enabled
(``WandbSink``); ``Trackers`` holds both and writes from the main process only.

W&B failures after start-up never stop training: the first error is reported, W&B is switched
off for the rest of the run, and everything stays in the output directory. The API key never
appears in anything the job writes or prints (``redact``).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import secrets
import string
import subprocess
import sys
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from job.config import BadInput, Config
from job.records import EpochRecord, RunSummary, shown_epoch
from job.run_dir import RunDir


class TrackingError(BadInput, RuntimeError):
    """W&B cannot start in the mode asked for; the message says what to do (exit 2)."""


def redact(text: str) -> str:
    """``text`` with the W&B API key (if any) masked: for every message that may quote it."""
    key = os.environ.get("WANDB_API_KEY", "")
    return text.replace(key, "***") if len(key) >= 4 else text


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


def run_facts(accelerator: Accelerator) -> dict:
    """World size, nodes, hardware, library versions and git commit, for the run's config."""
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


class HistorySink:
    """``history.jsonl``: one EpochRecord per line, read back through ``RunDir.epochs``."""

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.history_file

    def truncate(self, start_epoch: int) -> None:
        """On resume, drop lines of epochs that will run again (written after the last checkpoint)."""
        kept = [r for r in self.records() if r.epoch < start_epoch]
        self.path.write_text("".join(r.to_json() + "\n" for r in kept))

    def append(self, record: EpochRecord) -> None:
        with open(self.path, "a") as f:
            f.write(record.to_json() + "\n")

    def records(self) -> list[EpochRecord]:
        return self.run.epochs()


def _new_run_id() -> str:
    """8 lowercase letters/digits, like W&B's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def summary_scalars(summary: RunSummary) -> dict:
    """The run's summary for W&B: every field of RunSummary that is one value; the per-class
    accuracies, the confusion matrix and the class names go to W&B as a table and a plot."""
    values = dataclasses.asdict(summary)
    return {k: v for k, v in values.items() if not isinstance(v, (list, dict))}


class WandbSink:
    """One W&B run per job, resumed with the job (its id travels in the checkpoints)."""

    def __init__(self, wandb_module, output_dir: Path, warn):
        self.wandb, self.output_dir, self.warn = wandb_module, output_dir, warn
        self.run_dir = RunDir(output_dir)

    @classmethod
    def start(cls, cfg: Config, accelerator: Accelerator, output_dir: Path, mode: str, run_id: str) -> "WandbSink":
        import wandb

        tc = cfg.tracking
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=tc.project, entity=tc.entity, name=tc.run_name, group=tc.group,
                             tags=tc.tags or None, id=run_id, resume="allow", mode=mode,
                             dir=str(output_dir), config={**cfg.to_dict(), "run": run_facts(accelerator)},
                             settings=wandb.Settings(console="off", silent=True))  # WANDB_INIT_TIMEOUT applies
        except Exception as e:  # noqa: BLE001 - wandb raises many types for auth/network/disk problems
            hint = ("check WANDB_API_KEY (wandb.ai/authorize) and network access to the W&B server, or use "
                    "tracking.wandb=offline and `wandb sync` later" if mode == "online" else
                    "check free space and write permission in the output directory, or tracking.wandb=disabled")
            raise TrackingError(redact(f"W&B could not start in {mode} mode ({type(e).__name__}: {e}); {hint}")) \
                from None
        run.define_metric("epoch")
        for pattern, summary in (("val/accuracy", "max"), ("val/loss", "min"), ("val/*", None), ("epoch/*", None)):
            run.define_metric(pattern, step_metric="epoch", **({"summary": summary} if summary else {}))
        where = (f"offline, in {Path(run.dir).parent}; upload with `wandb sync {Path(run.dir).parent}`"
                 if mode == "offline" else run.get_url())
        accelerator.print(f"W&B run {run_id} ({where})")
        return cls(wandb, output_dir, accelerator.print)

    def _safely(self, what: str, fn) -> None:
        """Run a W&B call; on failure warn once and keep training without W&B."""
        if self.wandb is None:
            return
        try:
            fn(self.wandb)
        except Exception as e:  # noqa: BLE001
            self.warn(redact(f"warning: W&B {what} failed ({type(e).__name__}: {e}); W&B is off for the rest of "
                             f"this run, results stay in {self.output_dir}"))
            self.wandb = None

    def log_step(self, metrics: dict, step: int) -> None:
        self._safely("log", lambda wandb: wandb.log(metrics, step=step))

    def log_epoch(self, r: EpochRecord) -> None:
        payload = {"epoch": shown_epoch(r.epoch), "val/accuracy": r.val_accuracy, "val/loss": r.val_loss,
                   "epoch/train_loss": r.train_loss, "epoch/train_accuracy": r.train_accuracy, "epoch/lr": r.lr,
                   "epoch/seconds": r.epoch_seconds, "epoch/images_per_second": r.images_per_second,
                   "epoch/data_wait_fraction": r.data_wait_fraction}
        if r.val_accuracy_ema is not None:  # ema.epochs: the averaged weights beside the raw ones
            payload["val/accuracy_ema"] = r.val_accuracy_ema
        self._safely("log", lambda wandb: wandb.log(payload, step=r.step))

    def log_summary(self, values: dict) -> None:
        self._safely("summary", lambda wandb: wandb.run.summary.update(values))

    def finish(self, summary: RunSummary, samples: list[dict]) -> None:
        self._safely("summary", lambda wandb: self._log_final(wandb, summary, samples))
        self._safely("finish", lambda wandb: wandb.finish())

    def _log_final(self, wandb, m: RunSummary, samples: list[dict]) -> None:
        run = wandb.run
        for key, value in summary_scalars(m).items():
            run.summary[key] = value
        per_class = wandb.Table(columns=["class", "accuracy"],
                                data=[[c, m.test_per_class_accuracy[c]] for c in m.classes])
        y_true = [t for t, row in enumerate(m.confusion_matrix) for p, n in enumerate(row) for _ in range(n)]
        preds = [p for t, row in enumerate(m.confusion_matrix) for p, n in enumerate(row) for _ in range(n)]
        payload = {"test/per_class_accuracy": per_class,
                   "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true, preds=preds,
                                                                        class_names=m.classes),
                   "plots/curves": wandb.Image(str(self.run_dir.curves_png))}
        if samples:
            payload["test/samples"] = [wandb.Image(s["image"], caption=f"pred: {s['pred']} / true: {s['true']}")
                                       for s in samples]
        run.log(payload)
        best = self.run_dir.best
        if best.is_dir() and sum(f.stat().st_size for f in best.iterdir()) < 2 * 1024**3:
            # once per run: finish() runs once, on the main process, when the run completes
            step = best_step(self.run_dir, m)
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=model_metadata(self.run_dir, m, step))
            artifact.add_dir(str(best))
            run.log_artifact(artifact, aliases=["best", f"step-{step}"])


def best_step(run: RunDir, m: RunSummary) -> int:
    """The optimizer step after which best/'s weights were saved (the end of the best epoch)."""
    return next((r.step for r in run.epochs() if r.epoch == m.best_epoch), m.global_steps)


def model_metadata(run: RunDir, m: RunSummary, step: int) -> dict:
    """The model artifact's metadata: the test figures and best/model.json, the card."""
    return {"test_accuracy": m.test_accuracy, "test_samples": m.test_samples, "best_epoch": m.best_epoch,
            "step": step, "card": dataclasses.asdict(run.card())}


@dataclasses.dataclass(frozen=True)
class ExportTarget:
    """The W&B run a finished run logged to, found again for ``python -m job.export --wandb``."""

    run: RunDir
    run_id: str
    mode: str
    cfg: Config


def export_target(run: RunDir) -> ExportTarget:
    """The W&B run of ``run`` (its id from the folders W&B wrote in ``run/wandb``); a TrackingError
    when the run did not log to W&B."""
    import re

    cfg = run.config()
    run.summary()  # the artifact's metadata: a ConfigError now, before the export is written, if it is missing
    mode = resolve_mode(cfg.tracking.wandb)
    pattern = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-([a-z0-9]+)")  # W&B's folder of each process start
    found = sorted(m.groups() for m in (pattern.fullmatch(p.name) for p in
                                        (run.wandb.iterdir() if run.wandb.is_dir() else [])) if m)
    if mode == "disabled" or not found:
        raise TrackingError(f"{run.path} has no W&B run to attach an export to (tracking.wandb="
                            f"{cfg.tracking.wandb}, nothing in {run.wandb}); export without --wandb")
    return ExportTarget(run, found[-1][1], mode, cfg)


def log_export(target: ExportTarget, path: Path, fmt: str, result: dict, say=print) -> str:
    """Log an export of the run's best model to its W&B run (resumed) as the model artifact
    ``model-<run id>-<format>``, beside ``model-<run id>`` (best/); returns the artifact's name."""
    import wandb

    tc, run_dir = target.cfg.tracking, target.run
    name = f"model-{target.run_id}-{fmt}"
    summary = run_dir.summary()
    step = best_step(run_dir, summary)
    metadata = {**model_metadata(run_dir, summary, step), "format": fmt, "source_artifact": f"model-{target.run_id}",
                "max_probability_difference": result.get("max_probability_difference")}
    try:
        run = wandb.init(project=tc.project, entity=tc.entity, id=target.run_id, resume="allow", mode=target.mode,
                         dir=str(run_dir.path), settings=wandb.Settings(console="off", silent=True))
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        run.log_artifact(artifact, aliases=["best", f"step-{step}"])
        offline_dir = Path(run.dir).parent  # this process start's offline-run-* folder
        run.finish()
    except Exception as e:  # noqa: BLE001 - wandb raises many types for auth/network/disk problems
        raise TrackingError(redact(f"W&B could not log {path} to run {target.run_id} in {target.mode} mode "
                                   f"({type(e).__name__}: {e}); the export itself is written")) from None
    where = f"offline: `wandb sync {offline_dir}` uploads it" if target.mode == "offline" else "uploaded"
    say(f"W&B: {path} logged to run {target.run_id} as the model artifact {name} ({where})")
    return name


class Trackers:
    """The sinks of one run. Only the main process writes; on the others every call is a no-op."""

    def __init__(self, accelerator: Accelerator, cfg: Config, output_dir: Path, *, start_epoch: int,
                 run_id: str | None):
        self.is_main = accelerator.is_main_process
        self.output_dir = output_dir
        self.run_dir = RunDir(output_dir)
        self.history = HistorySink(self.run_dir)
        self.wandb: WandbSink | None = None
        self.run_id = run_id or os.environ.get("WANDB_RUN_ID") or _new_run_id()
        mode = resolve_mode(cfg.tracking.wandb)
        if not self.is_main:
            return
        self.history.truncate(start_epoch)
        if mode != "disabled":
            self.wandb = WandbSink.start(cfg, accelerator, output_dir, mode, self.run_id)

    def log_step(self, metrics: dict, step: int) -> None:
        if self.wandb:
            self.wandb.log_step(metrics, step)

    def log_epoch(self, record: EpochRecord) -> None:
        if self.is_main:
            self.history.append(record)
        if self.wandb:
            self.wandb.log_epoch(record)

    def log_summary(self, values: dict) -> None:
        if self.wandb:
            self.wandb.log_summary(values)

    def finish(self, summary: RunSummary, samples: list[dict]) -> None:
        """metrics.json, the PNG plots, and the final W&B summary, tables and model artifact."""
        if not self.is_main:
            return
        from job.reporting import plot_confusion_matrix, plot_curves, plot_samples

        run = self.run_dir
        run.summary_file.write_text(summary.to_json())
        plot_curves(self.history.records(), run.curves_png)
        plot_confusion_matrix(summary.confusion_matrix, summary.classes, run.confusion_png)
        if samples:
            plot_samples(samples, run.samples_png)
        if self.wandb:
            self.wandb.finish(summary, samples)
