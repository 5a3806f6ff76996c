"""What both image loaders share below their pipelines: the planned batches read from the store
(``BatchSource``) and the constructor over them (``ImageLoader``). DaliLoader (loader.py) and
TorchLoader (torch_loader.py) each import this module and not each other."""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_pipelines import sampling
from dali_pipelines.spec import LoaderSpec


def _read_file(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


class BatchSource:
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


class ImageLoader(sampling.PlannedLoader):
    """Shards, shuffles and augments one split for one rank (rules in dali_pipelines/sampling.py).

    Give it ``images`` (N, H, W, 3) uint8 (may be a memmap) or ``files`` (encoded JPEG/PNG paths),
    plus ``labels``. Iterate after ``set_epoch(epoch, start_sample)``; ``len()`` is the number of
    batches this rank yields in a full epoch, ``plan`` (a ``sampling.EpochPlan``) what the next
    iteration yields. ``batches`` replaces the sharding rule with explicit batches of sample
    indices (the feature cache's extraction order).
    """

    def __init__(self, *, labels: np.ndarray, spec: LoaderSpec, train: bool, shard: sampling.Shard,
                 images: np.ndarray | None = None, files: Sequence[str | Path] | None = None,
                 batches: list[np.ndarray] | None = None):
        if (images is None) == (files is None):
            raise ValueError("give exactly one of images= or files=")
        super().__init__(len(labels), train=train, shard=shard, augment=spec.augment, batches=batches)
        self.spec = spec
        self._source = BatchSource(images, [str(f) for f in files] if files is not None else None,
                                   np.asarray(labels), self.augment, io_threads=max(2, spec.num_threads))
        self._made_from = dict(labels=labels, train=train, shard=shard, images=images, files=files, batches=batches)

    def resized(self, image_size: int) -> "ImageLoader":
        """The same loader (split, shard, sampling, augmentation draws) making ``image_size`` px images:
        a new one, whose pipeline is built when it is first iterated (progressive resizing, job/resize.py)."""
        spec = dataclasses.replace(self.spec, prep=dataclasses.replace(self.spec.prep, image_size=image_size))
        return type(self)(spec=spec, **self._made_from)

    def close(self) -> None:
        """Release what the loader holds (its file readers); it is not iterated again."""
        if self._source.pool is not None:
            self._source.pool.shutdown(wait=True, cancel_futures=True)
