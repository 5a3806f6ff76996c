"""The feature cache: with the backbone frozen for the whole run, its pooled features of every
image are computed once (eval pipeline, no augmentation: the fixed-feature protocol), stored as
memory-mapped arrays, and the head trains on them for every epoch.

    {cache_root}/{key digest}/{split}_features.npy  (N, C) float16 or float32
                             /{split}_labels.npy    (N,) int64
                             /meta.json             the key and timings

The key covers everything that changes the features (``FeatureKey``). Extraction is sharded
over all ranks in whole batches, round-robin, so every sample is computed exactly once, in the
same batch whatever the world size; each step's features are all-gathered, and the local main
process of every node writes the arrays (into a temporary directory renamed when complete: a
job killed mid-extraction leaves nothing a later run would trust; it starts over).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator

from dali_pipelines import sampling
from dali_pipelines.loader import image_loader
from dali_pipelines.spec import RESIZE_INTERPOLATION, LoaderSpec
from job.atomic import ForeignDirectoryError, atomic_directory
from job.config import ConfigError
from job.distributed import all_ranks_or_none
from job.preemption import Preempted

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FeatureKey:
    """Everything that changes the cached features."""

    model: str
    weights: str  # file hash, Hub tag, or random seed (job.model.weights_identity)
    image_size: int  # every split's: cached runs train and evaluate at one size (job/config.py refuses others)
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    store: str  # the prepared store's fingerprint
    dtype: str  # of the stored features
    precision: str  # the autocast they were computed under: "bf16", "fp16" or "no"
    version: int = CACHE_VERSION
    # What is cached of each image: "pooled" (the head's input), or the output maps of the frozen
    # trunk before this module, and the views (job/trunk.py: "trunk:blocks.4:views=2").
    rows: str = "pooled"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def feature_key(cfg, prep, store, precision: str = "no", rows: str = "pooled") -> FeatureKey:
    """The key of a run's features: ``cfg`` a job.config.Config, ``prep`` the loader's
    Preprocessing (the size the features are computed at: data.image_size, one size with cached
    features), ``store`` the prepared store, ``precision`` the autocast precision of the extraction
    (Accelerator.mixed_precision), ``rows`` what is cached of each image (FeatureKey.rows)."""
    from job.model import weights_identity

    return FeatureKey(model=cfg.model.name, weights=weights_identity(cfg.model, cfg.train.seed),
                      image_size=prep.image_size, interpolation=RESIZE_INTERPOLATION, mean=tuple(prep.mean),
                      std=tuple(prep.std), store=store.fingerprint, dtype=cfg.features.dtype,
                      precision=precision, rows=rows)


@dataclass(frozen=True)
class Extraction:
    """What a cache holds for each image of each split: ``compute(images)`` -> (batch, *shape) rows
    (the backbone's pooled features by default; job/trunk.py caches the trunk's output maps)."""

    model: torch.nn.Module  # in eval mode while the rows are computed
    compute: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]]

    @classmethod
    def pooled(cls, model) -> "Extraction":
        row = (model.pooled_features, (model.backbone.num_features,))
        return cls(model, {split: row for split in SPLITS})

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.compute)


@dataclass
class FeatureSet:
    path: Path
    features: dict[str, np.ndarray]  # split -> (N, *row shape): (N, C) pooled, memory-mapped
    labels: dict[str, np.ndarray]
    reused: bool
    extraction_seconds: float  # this run's backbone pass; 0 when the cache was reused


def cached_features(accelerator: Accelerator, rows: torch.nn.Module | Extraction, store, spec: LoaderSpec,
                    key: FeatureKey, cache_root: Path, batch_size: int,
                    stop_requested: Callable[[], bool]) -> FeatureSet:
    """Reuse the cache for ``key`` or extract it on every rank: the rows of each split an Extraction
    names, or a model's pooled features of every split."""
    extraction = rows if isinstance(rows, Extraction) else Extraction.pooled(rows)
    path = Path(cache_root) / key.digest()
    local_ok = _complete(path, key)
    missing = accelerator.reduce(torch.tensor([0.0 if local_ok else 1.0], device=accelerator.device), "sum")
    seconds = 0.0
    if missing.item() > 0:  # some node lacks it: every rank takes part in the gathers
        start = time.perf_counter()
        extracted = _extract(accelerator, extraction, store, spec, batch_size, key.dtype, stop_requested)
        seconds = time.perf_counter() - start
        # The global main process writes first; then each other node's local main writes only if
        # its storage still lacks the cache (node-local disks), never racing it on shared storage.
        write = lambda: _write(path, key, store, extracted, seconds) if not _complete(path, key) else None  # noqa: E731
        all_ranks_or_none(accelerator, write if accelerator.is_main_process else lambda: None)
        all_ranks_or_none(accelerator, write if accelerator.is_local_main_process and not accelerator.is_main_process
                          else lambda: None)
    features = {s: np.load(path / f"{s}_features.npy", mmap_mode="r") for s in extraction.splits}
    labels = {s: np.load(path / f"{s}_labels.npy") for s in extraction.splits}
    return FeatureSet(path=path, features=features, labels=labels, reused=missing.item() == 0,
                      extraction_seconds=seconds)


def extraction_batches(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[np.ndarray]:
    """Batches of consecutive samples, dealt round-robin: rank r computes batches r, r+W, ...
    The batches are the same for any world size, so the features are too."""
    batches = [np.arange(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def _extract(acc: Accelerator, extraction: Extraction, store, spec: LoaderSpec, batch_size: int, dtype: str,
             stop_requested: Callable[[], bool]) -> dict[str, np.ndarray] | None:
    """Every rank computes its batches; the local main process of each node assembles all rows."""
    model = extraction.model
    was_training = model.training
    model.eval()
    torch_dtype, world = getattr(torch, dtype), acc.num_processes
    out = {}
    try:
        for split, (compute, shape) in extraction.compute.items():
            data = store.split(split)
            n = len(data)
            loader = image_loader(spec, labels=data.labels, images=data.images, files=data.files, train=False,
                                  batches=extraction_batches(n, world, acc.process_index, batch_size),
                                  shard=sampling.Shard(batch_size=batch_size))
            num_batches = -(-n // batch_size)
            steps = -(-num_batches // world)  # the most batches any rank has
            rows = HostRows(steps, world * batch_size, shape, torch_dtype, acc.device) \
                if acc.is_local_main_process else None
            batches, start = iter(loader), time.perf_counter()
            for step in range(steps):
                padded = torch.zeros(batch_size, *shape, dtype=torch_dtype, device=acc.device)
                images, _ = next(batches, (None, None))  # a rank may have one batch fewer: it still gathers
                if images is not None:
                    with acc.autocast():
                        feats = compute(images)
                    padded[: feats.shape[0]] = feats.to(torch_dtype)
                gathered = acc.gather(padded)  # (world x batch, *shape): batch step*W + r came from rank r
                if rows is not None:
                    rows.add(step, gathered)
                if stop_requested():
                    # nothing kept: the next run extracts again
                    raise Preempted(f"SIGTERM during feature extraction ({split}, step {step + 1}/{steps})")
            out[split] = rows.numpy(n) if rows is not None else None
            seconds = time.perf_counter() - start
            acc.print(f"cached {split}: {n} images x {shape} in {seconds:.0f}s ({n / max(seconds, 1e-9):.0f} images/s)")
    finally:
        model.train(was_training)
    return out if acc.is_local_main_process else None


class HostRows:
    """Each extraction step's gathered features, copied to the host as they come without waiting
    for the GPU: into pinned memory with ``non_blocking=True`` (from pageable memory such a copy is
    synchronous), read once, after the split's last step. Step s holds batches s*W .. s*W + W - 1 in
    order, so the buffer seen flat is the rows in sample order, padding last."""

    def __init__(self, steps: int, rows_per_step: int, shape: int | tuple[int, ...], dtype: torch.dtype,
                 device: torch.device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.buffer = torch.empty((steps, rows_per_step, *self.shape), dtype=dtype, pin_memory=self.pinned)

    def add(self, step: int, gathered: torch.Tensor) -> None:
        self.buffer[step].copy_(gathered, non_blocking=True)

    def numpy(self, n: int) -> np.ndarray:
        """The first ``n`` rows (the samples), once every copy has landed."""
        if self.pinned:
            torch.cuda.current_stream(self.device).synchronize()
        return self.buffer.view(-1, *self.shape)[:n].numpy()


def _write(path: Path, key: FeatureKey, store, extracted: dict[str, np.ndarray], seconds: float) -> None:
    try:
        with atomic_directory(path, is_ours=lambda p: (p / "meta.json").is_file()) as tmp:
            for split, rows in extracted.items():
                np.save(tmp / f"{split}_features.npy", rows)
                np.save(tmp / f"{split}_labels.npy", np.asarray(store.split(split).labels, dtype=np.int64))
            meta = {"key": asdict(key), "counts": {s: int(len(r)) for s, r in extracted.items()},
                    "extraction_seconds": seconds}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except ForeignDirectoryError as e:
        raise ConfigError(f"{e}: not a feature cache; set features.cache_dir to another directory") from None


def _complete(path: Path, key: FeatureKey) -> bool:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("key") == json.loads(json.dumps(asdict(key)))


class FeatureLoader(sampling.PlannedLoader):
    """The DaliLoader contract over cached rows: the same shard rule and the same per-epoch shuffle
    as the image loaders; batches are moved to ``device`` as float32 in ``memory_format``. The rows
    are used as stored, no augmentation; a subclass's ``rows`` may pick or move them with the
    epoch's augmentation draws (``augment``: job/trunk.py's TrunkLoader)."""

    memory_format = torch.contiguous_format

    def __init__(self, features: np.ndarray, labels: np.ndarray, *, train: bool, shard: sampling.Shard, device,
                 augment: bool = False):
        super().__init__(len(labels), train=train, shard=shard, augment=augment)
        self.features, self.labels, self.device = features, labels, device

    def rows(self, idx: np.ndarray, positions: np.ndarray, aug: sampling.Augmentation | None) -> torch.Tensor:
        """The host rows of samples ``idx`` (at ``positions`` of the epoch's draws)."""
        return torch.from_numpy(np.asarray(self.features[idx]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, aug = self.epoch_draws()
        for positions in self.plan.batches:
            idx = order[positions] if order is not None else positions
            x = self.rows(idx, positions, aug)
            y = torch.from_numpy(self.labels[idx])
            if torch.device(self.device).type == "cuda":  # non_blocking copies only from pinned memory
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)
