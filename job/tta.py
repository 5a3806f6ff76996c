"""Test-time flips (``tta:``): the test run once more averaging each image's and its mirror's
softmax, reported beside the plain accuracy (``test_accuracy_tta``), never instead of it."""
from __future__ import annotations

from typing import Callable

import torch

from job.components import Component
from job.config import TtaConfig


class TtaComponent(Component):
    name = "tta"

    def __init__(self, tta: str, say: Callable[[str], None] = print):
        self.tta, self.say = tta, say

    @classmethod
    def build(cls, cfg: TtaConfig, say: Callable[[str], None]) -> "TtaComponent | None":
        """None when ``tta.test`` is none (off)."""
        return cls(cfg.test, say) if cfg.test != "none" else None

    def after_test(self, test: dict, evaluate: Callable[..., dict], model: torch.nn.Module) -> None:
        tta = evaluate(model, tta=self.tta)
        test["accuracy_tta"] = tta["accuracy"]
        self.say(f"test accuracy {tta['accuracy']:.4f} with test-time {self.tta} ({test['accuracy']:.4f} without)")
