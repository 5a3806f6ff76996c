"""What a run's inputs look like, with no pipeline in it: the model's preprocessing and the
loaders' spec. Imported by the model (its card), the loaders and the pipelines alike, so none of
them imports another for it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The resize filter of every pipeline (DALI's and the torch loader's); part of the feature-cache key.
RESIZE_INTERPOLATION = "linear"
# What the model consumes under each mixed precision (Accelerator.mixed_precision), on a GPU.
INPUT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input, from timm's pretrained config (IRv2: 299 px,
    mean = std = 0.5); ``mean``/``std`` in [0, 1] units. Saved in every model card. Images are
    resized with RESIZE_INTERPOLATION."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]



@dataclass(frozen=True)
class AutoAugment:
    """An automatic augmentation policy of training loaders (data.auto_augment): RandAugment with
    ``n`` operations of magnitude bin ``m``, TrivialAugment Wide, or AutoAugment's (reduced)
    CIFAR-10 policy; run by nvidia.dali.auto_aug on the uint8 images (dali_pipelines/pipelines.py)."""

    name: str  # rand_augment | trivial_augment | auto_augment
    n: int = 2  # rand_augment only
    m: int = 9  # rand_augment only

    @classmethod
    def of(cls, name: str, n: int = 2, m: int = 9) -> "AutoAugment | None":
        """The policy named by data.auto_augment, or None for "none" (the name, n and m are checked
        once, with the config: job/config.py)."""
        return None if name == "none" else cls(name, n, m)


@dataclass(frozen=True)
class LoaderSpec:
    """How to turn samples into model inputs; the same for every loader of a run (train,
    evaluation, test, feature extraction, evaluate.py and predict.py)."""

    prep: Preprocessing
    num_threads: int  # DALI CPU threads (data.num_threads)
    dtype: str = "float32"  # float32 | float16 | bfloat16: what the model consumes (mixed precision)
    channels_last: bool = False
    device_id: int | None = None  # CUDA device for the GPU pipeline; None = CPU-only pipeline
    prefetch: int = 2  # batches DALI prepares ahead of the loop
    augment: bool = True  # random shifts and flips on training loaders (data.augment)
    backend: str = "dali"  # dali | torch (dali_pipelines/torch_loader.py): data.loader, resolved
    # data.auto_augment on training loaders (None = off); evaluation and feature extraction never
    auto_augment: AutoAugment | None = None

    @classmethod
    def for_run(cls, prep: Preprocessing, *, num_threads: int, device: torch.device,  # noqa: PLR0913
                precision: str = "no", channels_last: bool = False, augment: bool = False,
                auto_augment: AutoAugment | None = None, loader: str = "dali", say=print) -> "LoaderSpec":
        """The spec of a run on ``device`` under ``precision`` (Accelerator.mixed_precision)."""
        return cls(prep, num_threads=num_threads,
                   dtype=INPUT_DTYPES[precision] if device.type == "cuda" else "float32",
                   channels_last=channels_last, device_id=dali_device_id(device), augment=augment,
                   backend=resolve_backend(loader, say), auto_augment=auto_augment)


def dali_device_id(device: torch.device) -> int | None:
    """The CUDA device DALI's GPU operators should use for a torch device; None = CPU pipeline."""
    return (device.index or 0) if device.type == "cuda" else None


def resolve_backend(choice: str, say=print) -> str:
    """``data.loader``: ``dali`` or ``torch`` as asked; ``auto`` is DALI where it imports, else
    the torch loader, said out loud (it is slower: docs/BENCHMARKS.md)."""
    if choice != "auto":
        return choice
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        say(f"data.loader=auto: DALI is not importable here ({e}); using the PyTorch loader "
            "(same batches, slower: pip install nvidia-dali-cuda130 for the fast path)")
        return "torch"
    return "dali"
