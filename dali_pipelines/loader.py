"""The iterator the training loop sees: ``(images, labels)`` torch batches from a DALI pipeline,
with its length per epoch, its sample counts, and ``set_epoch(epoch, start_sample)`` for resume.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from dali_pipelines import sampling
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec


def image_loader(spec: LoaderSpec, **kwargs):
    """A DaliLoader or TorchLoader (same arguments, same batches) for ``spec.backend``."""
    if spec.backend == "torch":
        from dali_pipelines.torch_loader import TorchLoader

        return TorchLoader(spec=spec, **kwargs)
    return DaliLoader(spec=spec, **kwargs)


def make_loader(store, split: str, spec: LoaderSpec, *, train: bool, shard: Shard):
    """An image loader over one split of a prepared store (``job.data.Store``) for one rank."""
    data = store.split(split)
    return image_loader(spec, labels=data.labels, images=data.images, files=data.files, train=train, shard=shard)


def _read_file(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


class _BatchSource:
    """Callable for ``fn.external_source``: returns the next planned batch, then StopIteration.

    Encoded files are read by a small thread pool (file reads release the GIL), one batch ahead,
    so reading overlaps the training step instead of running on its thread.
    """

    def __init__(self, images, files, labels, augment: bool, io_threads: int):
        self.images, self.files, self.labels, self.augment = images, files, labels, augment
        self.plan: list[np.ndarray] = []
        self.order: np.ndarray | None = None
        self.aug: sampling.Augmentation | None = None
        self.cursor = 0
        self.pool = ThreadPoolExecutor(max_workers=io_threads) if files is not None else None
        self.ahead: dict[int, list[Future]] = {}
        self.auto_draws: tuple[int, int, int] | None = None  # (seed, epoch, count): auto-augment draws

    def restart(self, plan: list[np.ndarray], order: np.ndarray | None, aug) -> None:
        self.plan, self.order, self.aug, self.cursor = plan, order, aug, 0
        self.ahead.clear()

    def _indices(self, cursor: int) -> np.ndarray:
        positions = self.plan[cursor]
        return self.order[positions] if self.order is not None else positions

    def _read(self, cursor: int) -> list[Future]:
        return [self.pool.submit(_read_file, self.files[i]) for i in self._indices(cursor)]

    def __call__(self):
        if self.cursor >= len(self.plan):
            raise StopIteration
        cursor, positions = self.cursor, self.plan[self.cursor]
        self.cursor += 1
        idx = self._indices(cursor)
        if self.images is not None:
            # Sorted reads are friendlier to the page cache; the batch order is restored after.
            sort = np.argsort(idx, kind="stable")
            batch = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
            batch[sort] = self.images[idx[sort]]
        else:
            batch = [f.result() for f in self.ahead.pop(cursor, None) or self._read(cursor)]
            if self.cursor < len(self.plan):
                self.ahead[self.cursor] = self._read(self.cursor)
        out = (batch, self.labels[idx].astype(np.int64))
        if self.augment:
            out += (self.aug.shift[positions], self.aug.flip[positions])
        if self.auto_draws is not None:  # keyed by the sample's position in the epoch, like the shift
            seed, epoch, count = self.auto_draws
            out += (np.stack([np.random.default_rng([seed, epoch, 4, int(p)]).random(count, dtype=np.float32)
                              for p in positions]),)
        return out


class HeldOutputs:
    """Keeps each GPU batch alive until the GPU work that reads it has run.

    DALI's (default, dynamic) executor hands torch its own output buffers through DLPack. The
    host runs ahead of the GPU (no per-step sync, compiled graphs), so when the loop drops a
    batch its kernels may still be queued; DALI could then reuse the buffer for a later batch
    while they read it: a step would train on another batch's pixels with this batch's labels.
    When the next batch is asked for, an event is recorded on torch's stream after everything
    queued so far, and the batch is released only once that event has completed (the oldest is
    waited for when more than ``depth`` are held). On the CPU the work is done when the loop
    asks for the next batch, and nothing is held.
    """

    def __init__(self, depth: int, new_event=None):
        self.depth, self.held = depth, deque()
        self.new_event = new_event or (lambda: torch.cuda.Event())

    def hold(self, batch: tuple[torch.Tensor, ...]) -> None:
        if batch[0].device.type != "cuda":
            return
        event = self.new_event()
        event.record()  # on the current stream, after the step that read the batch
        self.held.append((event, batch))
        while self.held and self.held[0][0].query():
            self.held.popleft()
        while len(self.held) > self.depth:
            self.held.popleft()[0].synchronize()


class DaliLoader(sampling.PlannedLoader):
    """Shards, shuffles and augments one split for one rank (rules in dali_pipelines/sampling.py).

    Give it ``images`` (N, H, W, 3) uint8 (may be a memmap) or ``files`` (encoded JPEG/PNG paths),
    plus ``labels``. Iterate after ``set_epoch(epoch, start_sample)``; ``len()`` is the number of
    batches this rank yields in a full epoch, ``plan`` (a ``sampling.EpochPlan``) what the next
    iteration yields. ``batches`` replaces the sharding rule with explicit batches of sample
    indices (the feature cache's extraction order).
    """

    def __init__(self, *, labels: np.ndarray, spec: LoaderSpec, train: bool, shard: Shard,
                 images: np.ndarray | None = None, files: Sequence[str | Path] | None = None,
                 batches: list[np.ndarray] | None = None):
        if (images is None) == (files is None):
            raise ValueError("give exactly one of images= or files=")
        super().__init__(len(labels), train=train, shard=shard, augment=spec.augment, batches=batches)
        self.spec = spec
        self.auto_augment = spec.auto_augment if train else None  # evaluation never augments
        self._source = _BatchSource(images, [str(f) for f in files] if files is not None else None,
                                    np.asarray(labels), self.augment, io_threads=max(2, spec.num_threads))
        self._iterator = None
        self._exhausted = True
        self._held = HeldOutputs(depth=spec.prefetch + 2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._source.restart(self.plan.batches, *self.epoch_draws())
        if self.auto_augment is not None:
            from dali_pipelines.pipelines import auto_augment_draw_count

            self._source.auto_draws = (self.seed, self.epoch, auto_augment_draw_count(self.auto_augment))
        if not self._source.plan:
            return
        self._start()
        previous = None
        for data in self._iterator:
            if previous is not None:  # its step is queued now: hold DALI's buffers until it has run
                self._held.hold(previous)
            images, labels = data[0]["images"], data[0]["labels"].view(-1)
            previous = (data[0]["images"], data[0]["labels"])
            if self.spec.channels_last:  # NHWC memory seen as NCHW: channels_last, no copy
                images = images.permute(0, 3, 1, 2)
            if self.spec.dtype == "bfloat16":  # DALI has no bfloat16 output: float16, cast where it lives
                images = images.to(torch.bfloat16)
            yield images, labels
        if previous is not None:
            self._held.hold(previous)
        self._exhausted = True

    def _start(self) -> None:
        """(Re)start the DALI pipeline on the freshly planned epoch."""
        if self._iterator is not None and self._exhausted:
            self._exhausted = False
            self._iterator.reset()
            return
        # First epoch, or the previous one was abandoned midway (its prefetched batches are stale).
        # Auto-augmenting needs no new pipeline per epoch: its random choices come from the source
        # (per sample, keyed by (seed, epoch, position)), not from random operators seeded at build
        # (pipelines._HostDraws): the same images for one seed, on resume too, even mid-epoch.
        # (A rebuild per epoch cost 1.8-2.2 s on 2 CPU cores, against 35 ms for a reset.)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from dali_pipelines.pipelines import image_pipeline

        spec, prep = self.spec, self.spec.prep
        pipe = image_pipeline(
            self._source, augment=self.augment, encoded=self._source.files is not None,
            prep=prep,
            # bfloat16: DALI emits float16 (half the bytes of float32 through the pipeline's buffers;
            # normalized pixels lie well inside its range) and the loop casts it on the device.
            dtype="float16" if spec.dtype == "bfloat16" else spec.dtype,
            layout="HWC" if spec.channels_last else "CHW",
            device="cpu" if spec.device_id is None else "gpu",
            batch_size=self.plan.max_batch,
            num_threads=spec.num_threads, device_id=spec.device_id, prefetch_queue_depth=spec.prefetch,
            auto_augment=self.auto_augment, enable_conditionals=self.auto_augment is not None,
            seed=self.seed)
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], size=-1, auto_reset=False)
        self._exhausted = False
