"""Checkpoints (Accelerate's save_state, written atomically) and the best model.

Layout of ``output_dir``::

    checkpoints/epoch0003-step0000420/   model, optimizer, scheduler, scaler, RNG of every rank,
                                         TrainState and EarlyStopping (custom_checkpoint_*.pkl),
                                         config.yaml (the resolved config that wrote it)
    best/model.safetensors               unwrapped weights (no ``module.`` / ``_orig_mod.`` prefixes)
    best/model.json                      what is needed to rebuild the model and its inputs
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from job.atomic import atomic_directory

_NAME = re.compile(r"^epoch(\d+)-step(\d+)$")


class Checkpointer:
    def __init__(self, accelerator: Accelerator, output_dir: str | Path, keep: int, config=None):
        self.accelerator, self.keep, self.config = accelerator, keep, config
        self.dir = Path(output_dir) / "checkpoints"

    def save(self, epoch: int, global_step: int) -> Path:
        """All ranks call this. Written under a temporary name and renamed when complete, so a
        job killed mid-save leaves the previous checkpoint as the latest."""
        acc = self.accelerator
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
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.all()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def all(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: tuple(int(g) for g in _NAME.match(p.name).groups()))

    def resolve(self, resume: str) -> Path | None:
        """``auto``: the latest checkpoint, if any; ``never``: None; else the given directory."""
        if resume == "never":
            return None
        if resume == "auto":
            found = self.all()
            return found[-1] if found else None
        return Path(resume)

    def load(self, path: Path) -> None:
        self.accelerator.load_state(str(path))


def save_best(accelerator: Accelerator, model, output_dir: str | Path, meta: dict) -> None:
    """Main process writes ``best/`` atomically: weights in safetensors plus ``model.json``."""
    state = accelerator.get_state_dict(model)  # collective-safe; unwrapped names
    if not accelerator.is_main_process:
        return
    with atomic_directory(Path(output_dir) / "best") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "model.json").write_text(json.dumps(meta, indent=2))


def load_best_weights(model: torch.nn.Module, output_dir: str | Path) -> None:
    model.load_state_dict(load_file(str(Path(output_dir) / "best" / "model.safetensors")))
