"""Checkpoints (Accelerate's save_state plus our JSON state, written atomically) and the best model.

Layout of ``output_dir``::

    checkpoints/epoch0003-step0000420/   model (safetensors), optimizer, grad scaler and RNG of
                                         every rank (Accelerate's save_state), trainer_state.json
                                         (epoch/step, early stopping, LR schedule, W&B run id),
                                         config.yaml (the resolved config that wrote it)
    best/model.safetensors               the bare model's weights (no ``module.``/``_orig_mod.``)
    best/model.json                      its model card (job/model.py: ModelCard)

Loading is safe by construction: weights are safetensors, Accelerate reads the optimizer, scaler
and RNG files with ``torch.load(weights_only=True)``, and our own state is JSON, so a checkpoint
directory cannot run code. Only directories this job wrote (``trainer_state.json``) are resumed,
and only under the config they were written with, but for the keys RESUME_MAY_CHANGE names
(``check_resume``, before anything is built; a finished run launched again is left untouched).
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
import yaml
from safetensors.torch import load_file, save_file

from job.atomic import ForeignDirectoryError, atomic_directory
from job.bounds import first_line
from job.components import Component
from job.config import CHECKPOINT_MARKER, BadInput, CheckpointConfig, Config, ConfigError
from job.card import ModelCard
from job.records import RunSummary
from job.run_dir import RunDir

_NAME = re.compile(r"^epoch(\d+)-step(\d+)$")


class Checkpointer:
    """Saves and restores a run: what Accelerate prepared (model, optimizer, scaler, RNG) plus
    the registered ``states``, parts with ``state_dict``/``load_state_dict`` whose states are
    JSON (``trainer_state.json``, one key per part). A new stateful part is one more entry."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, keep: int, config: Config | None = None,
                 states: dict | None = None, tensor_states: dict | None = None):
        self.accelerator, self.keep, self.config = accelerator, keep, config
        self.states = states or {}
        # parts whose state is tensors (a weight EMA): {name}.safetensors beside the JSON
        self.tensor_states = tensor_states or {}
        self.dir = RunDir(output_dir).checkpoints
        self.changed_on_resume: dict[str, tuple] = {}  # set by load: {key: (checkpoint's value, this run's)}

    def save(self, epoch: int, global_step: int) -> Path:
        """All ranks call this. Written under a temporary name and renamed when complete, so a
        job killed mid-save leaves the previous checkpoint as the latest."""
        acc = self.accelerator
        trainer_state = {name: part.state_dict() for name, part in self.states.items()}
        final = self.dir / f"epoch{epoch:04d}-step{global_step:07d}"
        tmp = self.dir / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.config is not None:
                self.config.save(tmp / "config.yaml")
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(trainer_state, indent=1))
            for name, part in self.tensor_states.items():
                tensors = {k: v.detach().cpu().contiguous() for k, v in part.state_dict().items()}
                save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def all(self) -> list[Path]:
        """Complete checkpoints written by this job, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.is_dir() and _NAME.match(p.name) and (p / CHECKPOINT_MARKER).is_file()]
        return sorted(found, key=lambda p: tuple(int(g) for g in _NAME.match(p.name).groups()))

    def resolve(self, resume: str) -> Path | None:
        """``auto``: the latest checkpoint, if any; ``never``: None; else the given directory."""
        if resume == "never":
            return None
        if resume == "auto":
            # The main process lists and every rank takes its choice: on network storage a
            # restarted node may still see an older listing, and ranks that resumed from
            # different checkpoints would train on, out of step, without noticing.
            found = self.all() if self.accelerator.is_main_process else []
            (name,) = broadcast_object_list([found[-1].name if found else None])
            return self.dir / name if name else None
        return Path(resume)

    def load(self, path: Path) -> None:
        """Restore model, optimizer, scaler and RNG states, and every registered part."""
        try:
            trainer_state = json.loads((path / CHECKPOINT_MARKER).read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
            raise CheckpointError(f"{path}: not a readable checkpoint of this job ({e}); set train.resume=never "
                                  "to start over or point it at another checkpoint") from None
        if not isinstance(trainer_state, dict) or not self.states.keys() <= trainer_state.keys():
            raise CheckpointError(f"{path / CHECKPOINT_MARKER}: not the trainer state this job writes (it needs "
                                  f"{', '.join(self.states)}); resume from another checkpoint, or start over with "
                                  "train.resume=never")
        self._refuse_another_experiment(path)
        from safetensors import SafetensorError

        try:
            self.accelerator.load_state(str(path))
        except (pickle.UnpicklingError, OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            # weights_only loading refuses anything but tensors and plain containers; a model whose
            # shapes differ from the checkpoint's (another config) fails here too.
            raise CheckpointError(f"{path}: cannot restore this checkpoint ({type(e).__name__}: {first_line(e)}). Its "
                                  "files were not written by this job for this config, or were altered: resume from "
                                  "another checkpoint, or start over with train.resume=never") from None
        for name, part in self.tensor_states.items():
            try:
                part.load_state_dict(load_file(str(path / f"{name}.safetensors")))
            except (OSError, RuntimeError, SafetensorError) as e:
                raise CheckpointError(f"{path / (name + '.safetensors')}: cannot restore the run's {name} "
                                      f"({type(e).__name__}: {first_line(e)[:200]}); resume from another checkpoint, "
                                      "or start over with train.resume=never") from None
        for name, part in self.states.items():
            try:
                part.load_state_dict(trainer_state[name])
            except BadInput:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # an edited or foreign state
                raise CheckpointError(f"{path / CHECKPOINT_MARKER}: not the trainer state this job writes "
                                      f"(its {name!r}: {type(e).__name__}: {first_line(e)[:200]}); resume from "
                                      "another checkpoint, or start over with train.resume=never") from None


    def _refuse_another_experiment(self, path: Path) -> None:
        """A checkpoint continues only the run that wrote it (see ``refuse_changed_config``); what
        changed within RESUME_MAY_CHANGE is kept for the run's record of resumes."""
        if self.config is not None:
            self.changed_on_resume = refuse_changed_config(path, self.config)


class CheckpointError(BadInput):
    """A checkpoint that cannot be restored (damaged, altered, or not this job's): exit 2."""


# The keys a resume may change: how long the run trains (a larger train.epochs extends it), how it
# is logged, tracked and checkpointed, how long collectives wait, loader threads, the device, and
# where the same files are mounted (another pod sees the same data and weights at another path;
# the prepared store and the feature cache check what they hold). Every other key is what the
# checkpoint's weights, optimizer state and step counters mean: a resume that changes one is refused
# (data.image_size's size schedule and data.test_image_size among them: job/resize.py).
RESUME_MAY_CHANGE = ("train.epochs", "train.resume", "train.output_dir", "train.log_every", "train.signal_check_every",
                     "checkpoint.*", "timeouts.*", "train.device", "data.num_threads", "tracking.*",
                     "model.weights", "data.root", "data.download", "data.prepared_dir", "features.cache_dir")


def may_change_on_resume(key: str) -> bool:
    section = key.split(".")[0]
    return key in RESUME_MAY_CHANGE or f"{section}.*" in RESUME_MAY_CHANGE


def config_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """``{section.key: (saved value, current value)}`` for every key outside RESUME_MAY_CHANGE that
    differs (a key only one side has counts, with None on the other)."""
    diffs = {}
    for section in sorted(set(saved) | set(current)):
        before_section, now_section = saved.get(section) or {}, current.get(section) or {}
        for name in sorted(set(before_section) | set(now_section)):
            key = f"{section}.{name}"
            if may_change_on_resume(key):
                continue
            # A global batch is the experiment's; its per-process share may change with the world size.
            if key == "data.batch_size" and (current.get("data") or {}).get("global_batch_size") is not None:
                continue
            before, now = before_section.get(name), now_section.get(name)
            if before != now:
                diffs[key] = (before, now)
    return diffs


def saved_config(path: Path) -> dict:
    """The resolved config a checkpoint (or a run) was written with, as a mapping of sections."""
    saved_file = path / "config.yaml"
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        saved = e
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise CheckpointError(f"{saved_file}: not a config this job wrote; resume from another checkpoint, or start "
                              "over with train.resume=never")
    return saved


def refuse_changed_config(path: Path, config: Config) -> dict[str, tuple]:
    """Exit 2 (a ConfigError listing every differing key with both values, and the ways out) when
    ``config`` differs from the one ``path`` (a checkpoint or a run's output_dir) was written with
    outside RESUME_MAY_CHANGE: a resume would otherwise continue another experiment (say, ``make
    demo`` after editing its config, with the same output_dir), and its config.yaml would describe
    weights that were not trained with it. Returns the allowed differences (those recorded in
    resumes.jsonl)."""
    if not (path / "config.yaml").is_file():
        return {}
    saved = saved_config(path)
    current = config.to_dict()
    diffs = config_differences(saved, current)
    if diffs:
        lines = "\n".join(f"  {key}={before!r} there, {key}={now!r} in this run"
                          for key, (before, now) in diffs.items())
        raise ConfigError(f"{path} was written with another config; resuming would continue another experiment "
                          f"and describe its weights wrongly. {len(diffs)} key(s) differ:\n{lines}\nWays out: a new "
                          "train.output_dir (a new run beside this one), train.resume=never (start over here, "
                          "replacing it), or set the key(s) back. Only these may change on resume: "
                          f"{', '.join(RESUME_MAY_CHANGE)}")
    allowed = {}
    for section, values in current.items():
        for name, now in values.items():
            before = (saved.get(section) or {}).get(name)
            if before != now and name != "resume":
                allowed[f"{section}.{name}"] = (before, now)
    return allowed


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint this job wrote in ``output_dir`` (a plain listing, for the
    checks made before the Accelerator exists; ``Checkpointer.resolve`` is the collective one)."""
    directory = RunDir(output_dir).checkpoints
    if not directory.is_dir():
        return None
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / CHECKPOINT_MARKER).is_file()]
    return max(found, key=lambda p: tuple(int(g) for g in _NAME.match(p.name).groups()), default=None)


def check_resume(config: Config) -> RunSummary | None:
    """Before anything is built: with ``train.resume`` auto (or a checkpoint), refuse a config that
    differs from the one the checkpoint to resume (else the run's config.yaml) was written with,
    outside RESUME_MAY_CHANGE. Returns the summary of a run that has already finished (the same
    command again: nothing to do), None when the run is to start or go on (a larger train.epochs
    extends a finished run that did not stop early)."""
    tc = config.train
    if tc.resume == "never":
        return None
    run = RunDir(tc.output_dir)
    checkpoint = latest_checkpoint(run.path) if tc.resume == "auto" else Path(tc.resume)
    if checkpoint is not None:
        refuse_changed_config(checkpoint, config)
    if tc.resume != "auto" or not run.summary_file.is_file() or not run.is_ours():
        return None
    if checkpoint is None:  # a linear probe keeps no checkpoint: its config.yaml is the record
        refuse_changed_config(run.path, config)
    summary = run.summary()
    extends = tc.strategy != "linear_probe" and not summary.stopped_early and tc.epochs > summary.epochs_completed
    return None if extends and checkpoint is not None else summary


def finished_message(config: Config, summary: RunSummary) -> str:
    out = Path(config.train.output_dir).resolve()
    how = "stopped early" if summary.stopped_early else f"{summary.epochs_completed} epoch(s)"
    more = ("" if summary.stopped_early or config.train.strategy == "linear_probe"
            else f"; a larger train.epochs (> {summary.epochs_completed}) trains it on")
    return (f"{out} holds a finished run ({how}, test accuracy {summary.test_accuracy:.4f} on {summary.test_samples} "
            f"images): nothing to do, nothing touched. Outputs: {RunDir(out).summary_file}, {RunDir(out).best}/, "
            f"{RunDir(out).config_file}{more}; a new train.output_dir, or train.resume=never, starts another run")


def save_best(accelerator: Accelerator, weights: dict[str, torch.Tensor], output_dir: str | Path,
              card: ModelCard) -> None:
    """Main process writes ``best/`` atomically: the bare model's weights (its ``state_dict``) in
    safetensors plus its card."""
    if not accelerator.is_main_process:
        return
    best = RunDir(output_dir).best
    try:
        with atomic_directory(best, is_ours=RunDir.is_best) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            save_file(state, str(tmp / RunDir.WEIGHTS), metadata={"format": "pt"})
            (tmp / RunDir.CARD).write_text(card.to_json())
    except ForeignDirectoryError as e:
        raise ConfigError(f"{e}: refusing to replace it with the best model; choose another train.output_dir") from None


def load_best_weights(model: torch.nn.Module, output_dir: str | Path) -> None:
    model.load_state_dict(load_file(str(RunDir(output_dir).weights_file)))


class TimedCheckpoint(Component):
    """``checkpoint.every_minutes``: a mid-epoch checkpoint (the SIGTERM one, resumable) at least
    this often, besides those at epoch ends: it bounds the work a node lost without warning costs,
    and what a spot grace period too short for a full save (GKE: 15 s) costs. The main process's
    clock decides (PreemptionSignal.poll), so the ranks agree."""

    name = "timed_checkpoint"

    def __init__(self, every_minutes: float, say: Callable[[str], None] = print):
        self.every_minutes, self.say = every_minutes, say
        self.last = time.monotonic()  # counts from the end of setup

    @classmethod
    def build(cls, cfg: CheckpointConfig, say: Callable[[str], None]) -> "TimedCheckpoint | None":
        return cls(cfg.every_minutes, say) if cfg.every_minutes > 0 else None

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self.last >= self.every_minutes * 60

    def on_checkpoint(self, path: Path, timed: bool = False) -> None:
        self.last = time.monotonic()
        if timed:
            self.say(f"saved {path} (checkpoint.every_minutes={self.every_minutes:g})")
