"""What a person watching sees during an epoch: a live bar on an interactive terminal; in pod logs
(no TTY) a line every ``train.log_every`` updates says the same."""
from __future__ import annotations

import sys

from accelerate import Accelerator

from job.components import Component
from job.records import shown_epoch


class Progress(Component):
    name = "progress"

    def __init__(self, accelerator: Accelerator, epochs: int):
        self.accelerator, self.epochs = accelerator, epochs
        self.bar = None

    def on_epoch_start(self, epoch: int, batches: int, done: int) -> None:
        if not self.accelerator.is_main_process or not sys.stderr.isatty():
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=batches, initial=done, desc=f"epoch {shown_epoch(epoch)}/{self.epochs}", unit="batch",
                        dynamic_ncols=True, leave=False, file=sys.stderr)

    def on_batch(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def on_log(self, log) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{log.loss:.3f}", img_s=f"{log.images_per_second:.0f}",
                                 wait=f"{log.data_wait_fraction:.0%}", refresh=False)
        else:
            self.accelerator.print(f"step {log.step}: loss {log.loss:.4f} lr {log.lr:.2e} "
                                   f"{log.images_per_second:.0f} img/s data wait {log.data_wait_fraction:.0%}")

    def on_epoch_end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
