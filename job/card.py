"""``best/model.json``: what a finished run's best weights are (architecture, preprocessing, classes),
written by the trainer and read back, checked field by field, by every tool that serves the model."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from job.config import MAX_IMAGE_SIZE, ModelConfig

if TYPE_CHECKING:  # torch and timm load where a card is used, not in every reader of a run (bench/)
    from dali_pipelines.spec import Preprocessing


@dataclass
class ModelCard:
    """``best/model.json``: everything needed to rebuild the trained model and feed it, and
    nothing about where the data was (evaluation works wherever the store is mounted)."""

    model: str
    head_hidden: list[int]
    head_dropout: float
    head_activation: str
    image_size: int  # the size it is evaluated and served at: data.test_image_size, else the last training size
    mean: list[float]
    std: list[float]
    classes: list[str]
    epoch: int | None = None  # 0-based epoch whose weights these are
    val_accuracy: float | None = None
    weights: str = "raw"  # "ema": the weight EMA's (ema.epochs), which validation preferred

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        from dali_pipelines.spec import Preprocessing

        return Preprocessing(self.image_size, tuple(self.mean), tuple(self.std))

    def model_config(self) -> ModelConfig:
        return ModelConfig(name=self.model, pretrained=False, head_hidden=list(self.head_hidden),
                           head_dropout=self.head_dropout)

    @classmethod
    def for_run(cls, cfg: ModelConfig, prep: Preprocessing, classes: list[str]) -> "ModelCard":
        """``prep``: the run's evaluation preprocessing (job/model.py: create_model), whatever sizes
        it trained at (progressive resizing, FixRes: job/resize.py)."""
        from job.model import HEAD_ACTIVATION

        return cls(model=cfg.name, head_hidden=list(cfg.head_hidden), head_dropout=cfg.head_dropout,
                   head_activation=HEAD_ACTIVATION, image_size=prep.image_size, mean=list(prep.mean),
                   std=list(prep.std), classes=list(classes))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        return cls(**json.loads(text))

    def problem(self) -> str | None:
        """What makes this card unusable (read from a file, it may say anything), or None."""
        import timm

        from job.model import HEAD_ACTIVATION

        def numbers(values, kind=(int, float)) -> bool:
            return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)

        if not isinstance(self.model, str) or not timm.is_model(self.model):
            return f"model {self.model!r:.80} is not a timm model"
        if not numbers(self.head_hidden, int) or any(h < 1 for h in self.head_hidden):
            return "head_hidden is not a list of positive integers"
        if self.head_activation != HEAD_ACTIVATION:  # the only one this job builds (job/model.py)
            return f"head_activation {self.head_activation!r:.40} is not {HEAD_ACTIVATION!r}"
        if not numbers([self.head_dropout]) or not 0 <= self.head_dropout < 1:
            return "head_dropout is not a number in [0, 1)"
        if not numbers([self.image_size], int) or not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            return f"image_size is not an integer in [16, {MAX_IMAGE_SIZE}]"
        if not (numbers(self.mean) and numbers(self.std) and len(self.mean) == len(self.std) == 3
                and all(s > 0 for s in self.std)):
            return "mean and std are not 3 numbers each (std > 0)"
        names = self.classes if isinstance(self.classes, list) else []
        if len(names) < 2 or not all(isinstance(c, str) for c in names) or len(set(names)) != len(names):
            return "classes is not a list of at least 2 distinct names"
        return None
