"""Where metrics go: ``history.jsonl`` in the output directory always, W&B when enabled.

Only the main process writes; every method is a no-op elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator


class Tracker:
    def __init__(self, accelerator: Accelerator, output_dir: str | Path, *, start_epoch: int):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.history_path = self.output_dir / "history.jsonl"
        if accelerator.is_main_process:
            self._truncate_history(start_epoch)

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

    def log_step(self, metrics: dict, step: int) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self, metrics: dict) -> None:
        pass
