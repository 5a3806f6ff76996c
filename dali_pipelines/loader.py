"""The iterator the training loop sees: ``(images, labels)`` torch batches from a DALI pipeline,
with its length per epoch, its sample counts, and ``set_epoch(epoch, start_sample)`` for resume.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import torch

from dali_pipelines.sampling import Shard
from dali_pipelines.source import ImageLoader
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


def dali_output_dtype(dtype: str) -> tuple[str, torch.dtype | None]:
    """What the DALI graph emits for a model input ``dtype``, and the cast after it (None: none).
    DALI has no bfloat16 output: bfloat16 is emitted as float16 (half the bytes of float32 through
    the pipeline's buffers; normalized pixels lie well inside its range), then cast where it lives."""
    if dtype == "bfloat16":
        return "float16", torch.bfloat16
    return dtype, None


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


class DaliLoader(ImageLoader):
    """An ``ImageLoader`` (dali_pipelines/source.py: the arguments and the sampling) whose batches
    come out of the DALI graph of dali_pipelines/pipelines.py."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.auto_augment = self.spec.auto_augment if self.train else None  # evaluation never augments
        self._emit, self._cast = dali_output_dtype(self.spec.dtype)
        self._iterator = None
        self._exhausted = True
        self._held = HeldOutputs(depth=self.spec.prefetch + 2)

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
            if self._cast is not None:
                images = images.to(self._cast)
            yield images, labels
        if previous is not None:
            self._held.hold(previous)
        self._exhausted = True

    def close(self) -> None:
        """Wait until the GPU work that reads the last batches has run (DALI reuses or frees their
        buffers with the pipeline), then drop the pipeline."""
        super().close()
        while self._held.held:
            self._held.held.popleft()[0].synchronize()
        self._iterator = None

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
            prep=prep, dtype=self._emit,
            layout="HWC" if spec.channels_last else "CHW",
            device="cpu" if spec.device_id is None else "gpu",
            batch_size=self.plan.max_batch,
            num_threads=spec.num_threads, device_id=spec.device_id, prefetch_queue_depth=spec.prefetch,
            auto_augment=self.auto_augment, enable_conditionals=self.auto_augment is not None,
            seed=self.seed)
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], size=-1, auto_reset=False)
        self._exhausted = False
