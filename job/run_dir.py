"""The files of one run's ``train.output_dir``, named once: every writer takes its path from
``RunDir`` and every reader reads the files back typed (``summary()``, ``epochs()``, ``card()``,
``config()``), with the same one-line refusal naming the file when one is damaged.

    config.yaml            the resolved config (job/config.py: Config.save)
    history.jsonl          one EpochRecord per epoch (job/records.py)
    metrics.json           the RunSummary, written when the run finishes
    resumes.jsonl          one line per resume: time, world size, checkpoint, the keys changed
    best/model.safetensors the best epoch's bare weights; best/model.json its ModelCard
    checkpoints/           resumable states (job/checkpoint.py owns what is inside)
    curves.png, confusion_matrix.png, test_samples.png    the plots (job/reporting.py)
    wandb/                 W&B's own files (offline runs, logs)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from job.bounds import shown
from job.card import ModelCard
from job.config import CONFIG_HEADER, Config, ConfigError, config_from_dict, read_yaml_mapping
from job.records import EpochRecord, RunSummary

if TYPE_CHECKING:
    from job.model import TransferModel


@dataclass(frozen=True)
class RunDir:
    path: Path

    # Inside best/: save_best writes them into a temporary folder first, so they are spelled apart.
    WEIGHTS: ClassVar[str] = "model.safetensors"
    CARD: ClassVar[str] = "model.json"

    @classmethod
    def is_best(cls, folder: Path) -> bool:
        """Whether ``folder`` is a best/ this job wrote: it holds a model card."""
        return (Path(folder) / cls.CARD).is_file()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------ the names
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def history_file(self) -> Path:
        return self.path / "history.jsonl"

    @property
    def resumes_file(self) -> Path:
        return self.path / "resumes.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def weights_file(self) -> Path:
        return self.best / self.WEIGHTS

    @property
    def card_file(self) -> Path:
        return self.best / self.CARD

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def curves_png(self) -> Path:
        return self.path / "curves.png"

    @property
    def confusion_png(self) -> Path:
        return self.path / "confusion_matrix.png"

    @property
    def samples_png(self) -> Path:
        return self.path / "test_samples.png"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    def record_resume(self, checkpoint: Path, world_size: int, changed: dict[str, tuple]) -> None:
        """Append one line to ``resumes.jsonl``: config.yaml keeps describing the weights, this
        says when the run was resumed, on how many processes, and which keys (those a resume may
        change: job/checkpoint.py, RESUME_MAY_CHANGE) were overridden, with both values."""
        import json
        from datetime import datetime, timezone

        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": world_size,
                 "checkpoint": Path(checkpoint).name,
                 "overrides": {key: {"was": before, "now": now} for key, (before, now) in changed.items()}}
        with open(self.resumes_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def clear_previous_run(self, checkpoints: list[Path]) -> list[str]:
        """A run starting from scratch (``train.resume=never``, or no checkpoint to resume) in a
        folder an earlier run of this job wrote: that run's outputs go first, so config.yaml never
        sits beside weights, figures or checkpoints another config made (a later ``resume=auto``
        would otherwise pick up the old run's ``checkpoints``: the complete ones this job wrote).
        Only what this job wrote: each record is read back first, and one that is not ours is a
        ConfigError naming it before anything is removed; a ``best/`` without its card stays (the
        run refuses to replace it when it saves). ``wandb/`` stays (W&B keeps runs under their
        ids). Returns what was removed."""
        import shutil

        if not self.is_ours():
            return []
        self.epochs()
        self.resumes()
        if self.summary_file.exists():
            self.summary()
        removed = []
        if self.is_best(self.best) and not self.best.is_symlink():
            shutil.rmtree(self.best)
            removed.append("best/")
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
        if checkpoints:
            removed.append(f"{len(checkpoints)} checkpoint(s)")
        for path in (self.summary_file, self.history_file, self.resumes_file, self.curves_png, self.confusion_png,
                     self.samples_png):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
        return removed

    def resumes(self) -> list[dict]:
        """``resumes.jsonl`` read back ([] for a run never resumed)."""
        import json

        if not self.resumes_file.is_file():
            return []
        try:
            return [json.loads(line) for line in self.resumes_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ConfigError(f"{self.resumes_file} is not a record of resumes of this job ({shown(str(e))}); move "
                              "it away") from None

    # ------------------------------------------------------------------------------ the readers
    def config(self) -> Config:
        """The resolved config the run wrote; a ConfigError naming the file otherwise."""
        raw = read_yaml_mapping(self.config_file, "the run's config")
        try:
            return config_from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{e} (in {self.config_file})") from None

    def epochs(self) -> list[EpochRecord]:
        """``history.jsonl``, one record per epoch ([] before the first epoch)."""
        path = self.history_file
        if not path.exists():
            return []
        try:
            if not path.is_file():  # a FIFO would block the run
                raise OSError("not a regular file")
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} cannot be read ({e}); move it away or use another train.output_dir") from None
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(EpochRecord.from_json(line))
            except (ValueError, TypeError, RecursionError) as e:  # not JSON, not a mapping, other keys
                raise ConfigError(f"{path}: line {number} is not an epoch record of this job ({shown(str(e))}); "
                                  "move the file away or use another train.output_dir") from None
        return records

    def summary(self) -> RunSummary:
        """``metrics.json`` of a finished run; a ConfigError naming the file otherwise."""
        path = self.summary_file
        if not path.is_file():
            raise ConfigError(f"{path} not found: has the run in {self.path} finished?")
        try:
            return RunSummary.from_json(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
            raise ConfigError(f"{path} is not a run summary of this job ({type(e).__name__}: "
                              f"{shown(str(e))})") from None

    def card(self) -> ModelCard:
        """``best/model.json``, checked field by field: a WeightsError names the file otherwise."""
        from job.weights import WeightsError

        path = self.card_file
        try:
            card = ModelCard.from_json(path.read_text())
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
            raise WeightsError(f"{path} is not a model card of this job ({type(e).__name__}: {str(e)[:200]}); "
                               "copy the run's best/ again") from None
        problem = card.problem()
        if problem:
            raise WeightsError(f"{path} is not a model card of this job: {problem}; copy the run's best/ again")
        return card

    def is_ours(self) -> bool:
        """Whether this folder is an output_dir this job wrote: its config.yaml starts with
        CONFIG_HEADER."""
        if not self.config_file.is_file():  # a FIFO would block the read
            return False
        try:
            with open(self.config_file, encoding="utf-8", errors="replace") as f:
                return f.readline().rstrip("\n") == CONFIG_HEADER
        except OSError:
            return False


def load_trained(run_dir: RunDir | str | Path) -> tuple[TransferModel, ModelCard]:
    """The best model of a finished run (``run_dir/best``) and its model card. The card and the
    weights file are checked against each other (shapes from the file's header, the model built
    on the meta device) before anything is allocated: an edited card cannot ask for a huge head."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from job.model import create_model
    from job.weights import WeightsError

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    weights = run.weights_file
    if not weights.is_file() or not run.card_file.is_file():
        raise WeightsError(f"{weights} or {run.card_file.name} not found: is {run.path} the output_dir of a "
                           "run that finished at least one epoch?")
    card = run.card()
    try:
        with safe_open(str(weights), framework="pt") as f:
            in_file = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        with torch.device("meta"):
            skeleton, _ = create_model(card.model_config(), card.num_classes)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        if in_file != expected:
            differ = sorted(k for k in expected.keys() | in_file.keys() if expected.get(k) != in_file.get(k))
            raise WeightsError(f"{weights} does not fit the model {run.card_file} describes ({card.model}, head "
                               f"{card.head_hidden}, {card.num_classes} classes): {len(differ)} tensor(s) differ "
                               f"(first: {differ[0]} {in_file.get(differ[0])} vs {expected.get(differ[0])}); "
                               "was model.json edited?")
        model, _ = create_model(card.model_config(), card.num_classes)
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{weights} is not a readable safetensors file ({str(e)[:200]}): damaged or truncated; "
                           "copy the run again or train anew") from None
    return model.eval(), card
