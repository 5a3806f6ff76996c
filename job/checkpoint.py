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
directory cannot run code. Only directories this job wrote (``trainer_state.json``) are resumed.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
import yaml
from safetensors.torch import load_file, save_file

from job.atomic import ForeignDirectoryError, atomic_directory
from job.config import CHECKPOINT_MARKER, Config, ConfigError
from job.model import ModelCard
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
            raise ConfigError(f"{path}: not a readable checkpoint of this job ({e}); set train.resume=never "
                              "to start over or point it at another checkpoint") from None
        if not isinstance(trainer_state, dict) or not self.states.keys() <= trainer_state.keys():
            raise ConfigError(f"{path / CHECKPOINT_MARKER}: not the trainer state this job writes (it needs "
                              f"{', '.join(self.states)}); resume from another checkpoint, or start over with "
                              "train.resume=never")
        self._refuse_another_experiment(path)
        from safetensors import SafetensorError

        try:
            self.accelerator.load_state(str(path))
        except (pickle.UnpicklingError, OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            # weights_only loading refuses anything but tensors and plain containers; a model whose
            # shapes differ from the checkpoint's (another config) fails here too.
            raise ConfigError(f"{path}: cannot restore this checkpoint ({type(e).__name__}: {_first_line(e)}). Its "
                              "files were not written by this job for this config, or were altered: resume from "
                              "another checkpoint, or start over with train.resume=never") from None
        for name, part in self.tensor_states.items():
            try:
                part.load_state_dict(load_file(str(path / f"{name}.safetensors")))
            except (OSError, RuntimeError, SafetensorError) as e:
                raise ConfigError(f"{path / (name + '.safetensors')}: cannot restore the run's {name} "
                                  f"({type(e).__name__}: {_first_line(e)[:200]}); resume from another checkpoint, "
                                  "or start over with train.resume=never") from None
        for name, part in self.states.items():
            try:
                part.load_state_dict(trainer_state[name])
            except ConfigError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as e:  # an edited or foreign state
                raise ConfigError(f"{path / CHECKPOINT_MARKER}: not the trainer state this job writes (its {name!r}: "
                                  f"{type(e).__name__}: {_first_line(e)[:200]}); resume from another checkpoint, "
                                  "or start over with train.resume=never") from None


    def _refuse_another_experiment(self, path: Path) -> None:
        """A checkpoint continues only the run that wrote it: resuming it under another model,
        head, input size, data source, strategy, seed or batch size (say, ``make demo`` after
        editing its config, with the same output_dir) would silently mix two experiments."""
        saved_file = path / "config.yaml"
        if self.config is None or not saved_file.is_file():
            return
        try:
            saved = yaml.safe_load(saved_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            saved = e
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k.split(".")[0], {}), dict)
                                                  for k in RESUME_MUST_MATCH):
            raise ConfigError(f"{saved_file}: not a config this job wrote; resume from another checkpoint, or "
                              "start over with train.resume=never")
        current = self.config.to_dict()
        # A global batch is the experiment's; its per-process share may change with the world size.
        keys = [k for k in RESUME_MUST_MATCH if k != "data.batch_size" or current["data"]["global_batch_size"] is None]
        for key in keys:
            section, name = key.split(".")
            before, now = saved.get(section, {}).get(name), current[section][name]
            if before != now:
                raise ConfigError(f"{path} was written with {key}={before!r}, this run has {key}={now!r}: resuming "
                                  "would continue another experiment. Use a new train.output_dir, start over with "
                                  f"train.resume=never, or set {key} back")


# What a checkpoint's weights and step counters mean (model.weights is left out: the same file may
# be mounted at another path).
RESUME_MUST_MATCH = ("model.name", "model.pretrained", "model.head_hidden", "data.source", "data.image_size",
                     "data.batch_size", "data.global_batch_size", "train.strategy", "train.seed", "train.ema_epochs")


def save_best(accelerator: Accelerator, weights: dict[str, torch.Tensor], output_dir: str | Path,
              card: ModelCard) -> None:
    """Main process writes ``best/`` atomically: the bare model's weights (its ``state_dict``) in
    safetensors plus its card."""
    if not accelerator.is_main_process:
        return
    best = RunDir(output_dir).best
    try:
        with atomic_directory(best, is_ours=lambda p: (p / RunDir.CARD).is_file()) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            save_file(state, str(tmp / RunDir.WEIGHTS), metadata={"format": "pt"})
            (tmp / RunDir.CARD).write_text(card.to_json())
    except ForeignDirectoryError as e:
        raise ConfigError(f"{e}: refusing to replace it with the best model; choose another train.output_dir") from None


def load_best_weights(model: torch.nn.Module, output_dir: str | Path) -> None:
    model.load_state_dict(load_file(str(RunDir(output_dir).weights_file)))


def check_output_dir(out: Path) -> None:
    """Refuse an unusable output directory before any data or model is built (and create nothing:
    a refused run leaves no trace)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == out else f"is inside {existing}, which is a file"
        raise ConfigError(f"train.output_dir={out} {what}; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir={out}: {existing} is not writable; choose a writable path")
    run = RunDir(out)
    best = run.best
    if best.exists() and not run.card_file.is_file() and (not best.is_dir() or any(best.iterdir())):
        raise ConfigError(f"{best} exists and was not written by this job (no model.json); it would be replaced "
                          "by the best model: choose another train.output_dir")
    if out.is_dir() and any(out.iterdir()) and not run.is_ours():
        raise ConfigError(f"train.output_dir={out} is a non-empty folder that no run of this job wrote (no "
                          "config.yaml of ours): its config.yaml, history.jsonl, best/ would be overwritten. "
                          "Nothing was written; choose a new or empty train.output_dir")


def _first_line(e: BaseException) -> str:
    """An exception's message cut to one line (torch's run to paragraphs) for a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""
