"""The DALI loader's contract on PyTorch alone (``data.loader=torch``): for machines without DALI
(a CUDA 12 driver, macOS, ARM, a bare GPU node for the smoke test) and as a baseline.

The same sampling plan (dali_pipelines/sampling.py), the same augmentation parameters, the same
outputs (shape, dtype, layout) as ``DaliLoader``, within interpolation rounding (tested against
it in tests/test_torch_loader.py). Raw 32x32 images cross to the device as uint8 (3 KB each);
the shift, flip, normalization and upscale run there, as in the DALI graph. Encoded files are
decoded on the host (PIL, a thread pool one batch ahead), resized there one by one (their sizes
differ), then normalized on the device. DALI stays the default and the faster path
(docs/BENCHMARKS.md). ``data.auto_augment`` uses torchvision's policies instead of DALI's, with
draws of their own (``_AutoAugmenter``): the one place the two loaders' batches differ by design.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dali_pipelines.source import ImageLoader
from dali_pipelines.spec import RESIZE_INTERPOLATION

_MODES = {"linear": "bilinear", "cubic": "bicubic"}


class TorchLoader(ImageLoader):
    """``DaliLoader``'s interface and batches, built with torch operations (module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        spec = self.spec
        self._auto = _AutoAugmenter(spec.auto_augment) if self.train and spec.auto_augment is not None else None
        self.device = torch.device("cpu") if spec.device_id is None else torch.device("cuda", spec.device_id)
        encoded = self._source.files is not None
        self._decoder = ThreadPoolExecutor(max_workers=max(1, spec.num_threads)) if encoded else None
        mean = torch.tensor(spec.prep.mean, dtype=torch.float32, device=self.device) * 255
        std = torch.tensor(spec.prep.std, dtype=torch.float32, device=self.device) * 255
        self._mean, self._std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)

    def close(self) -> None:
        super().close()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._source.restart(self.plan.batches, *self.epoch_draws())
        with ThreadPoolExecutor(max_workers=1) as ahead:  # the next batch's host work overlaps this step
            pending = ahead.submit(self._host_batch)
            while True:
                batch = pending.result()
                if batch is None:
                    return
                pending = ahead.submit(self._host_batch)
                yield self._device_batch(*batch)

    # ------------------------------------------------------------------ host side
    def _host_batch(self):
        """The next planned batch as host arrays (images decoded and resized when encoded), or None."""
        try:
            out = self._source()
        except StopIteration:
            return None
        images, labels = out[0], out[1]
        shift, flip = (out[2], out[3]) if self.augment else (None, None)
        # Auto-augment draws per sample, keyed by its position in the epoch (like the shift and flip).
        auto = None
        if self._auto is not None:
            positions = self._source.plan[self._source.cursor - 1]  # the batch just returned
            auto = [np.random.default_rng([self.seed, self.epoch, 3, int(p)]) for p in positions]
        if self._decoder is not None:
            jobs = [self._decoder.submit(self._decode, data, None if shift is None else shift[i],
                                         0 if flip is None else int(flip[i]), None if auto is None else auto[i])
                    for i, data in enumerate(images)]
            images = np.stack([j.result() for j in jobs])
            shift = flip = auto = None  # applied per image before its resize, as DALI does
        # Everything the device side needs, as tensors ready to copy: the shift's gather indices are
        # computed here, where the shift was drawn (reading them back from the GPU would wait for
        # the previous step), and on a GPU they sit in pinned memory, so that the copies with
        # non_blocking=True really are asynchronous (from pageable memory they are not).
        pin = self.device.type == "cuda"
        gather = None if shift is None else _shift_indices(np.asarray(shift), *images.shape[1:3])
        return (_host_tensor(np.ascontiguousarray(images), pin), _host_tensor(labels, pin),
                None if gather is None else (gather[0], _host_tensor(gather[1], pin), _host_tensor(gather[2], pin)),
                None if flip is None else _host_tensor(np.asarray(flip, dtype=bool), pin), auto)

    def _decode(self, data: np.ndarray, shift, flip: int, auto_rng) -> np.ndarray:
        """One encoded image -> (size, size, 3) uint8: decode, translate, auto-augment, mirror, resize
        (antialiased)."""
        from PIL import Image

        with Image.open(io.BytesIO(data.tobytes())) as im:
            pixels = np.array(im.convert("RGB"))  # writable: torch.from_numpy below
        x = torch.from_numpy(pixels).unsqueeze(0)  # (1, H, W, 3)
        if shift is not None:
            x = _translate(x, _shift_indices(np.asarray(shift).reshape(1, 2), *x.shape[1:3]))
        if auto_rng is not None:
            x = self._auto(x[0].permute(2, 0, 1), auto_rng).permute(1, 2, 0).unsqueeze(0)
        if flip:
            x = x.flip(2)
        size = self.spec.prep.image_size
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode=_MODES[RESIZE_INTERPOLATION],
                          align_corners=False, antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()

    # ------------------------------------------------------------------ device side
    def _device_batch(self, images: torch.Tensor, labels: torch.Tensor, shift, flip, auto):
        """The device's work on one batch: no value is read back to the host (no sync per batch)."""
        x = images.to(self.device, non_blocking=True)  # uint8, once
        y = labels.to(self.device, non_blocking=True)
        if shift is not None:
            pad, rows, cols = shift
            x = _translate(x, (pad, rows.to(self.device, non_blocking=True), cols.to(self.device, non_blocking=True)))
        if auto is not None:  # one image at a time: every sample draws its own operations
            x = torch.stack([self._auto(img.permute(2, 0, 1), rng).permute(1, 2, 0) for img, rng in zip(x, auto)])
        if flip is not None:
            mirror = flip.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            x = torch.where(mirror, x.flip(2), x)
        x = (x.permute(0, 3, 1, 2).float() - self._mean) / self._std  # NCHW view of NHWC memory
        size = self.spec.prep.image_size
        if x.shape[-1] != size or x.shape[-2] != size:  # normalize first, then one resize pass (as DALI)
            x = F.interpolate(x, size=(size, size), mode=_MODES[RESIZE_INTERPOLATION], align_corners=False,
                              antialias=False)
        fmt = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        return x.to(dtype=getattr(torch, self.spec.dtype), memory_format=fmt), y


def _host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pin else tensor


def _shift_indices(shift: np.ndarray, h: int, w: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(pad, rows (B, H), cols (B, W))`` for ``_translate``: the (B, 2) (x, y) shift fractions
    rounded to pixels on the host (float32 products, rounded half to even, as torch.round did)."""
    shift = shift.astype(np.float32, copy=False)
    dx = np.round(shift[:, 0] * np.float32(w)).astype(np.int64)
    dy = np.round(shift[:, 1] * np.float32(h)).astype(np.int64)
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    rows = np.arange(h, dtype=np.int64)[None, :] + dy[:, None] + pad
    cols = np.arange(w, dtype=np.int64)[None, :] + dx[:, None] + pad
    return pad, rows, cols


def _translate(images: torch.Tensor, indices) -> torch.Tensor:
    """(B, H, W, C) images moved by a shift of (x, y) fractions of the side, zero padded: output
    pixel (y, x) = input (y + dy, x + dx), as DALI's slice with a relative start. ``indices``:
    ``_shift_indices``'s, with rows and cols as tensors on the images' device."""
    pad, rows, cols = indices
    if pad == 0:
        return images
    b, h, w, _ = images.shape
    rows = torch.as_tensor(rows, device=images.device)
    cols = torch.as_tensor(cols, device=images.device)
    padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # zeros around H and W
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return padded[batch, rows.view(b, h, 1), cols.view(b, 1, w)]


class _AutoAugmenter:
    """data.auto_augment with torchvision's policies (v2 RandAugment(num_ops=n, magnitude=m),
    TrivialAugmentWide, AutoAugment(CIFAR10)) on one (3, H, W) uint8 image. torchvision draws from
    torch's global generator, which the training thread shares; here the same choices (operation,
    magnitude bin, sign, sub-policy, probabilities) are drawn from a NumPy generator per sample,
    seeded by (seed, epoch, position in the epoch): exact on resume and for any world size. The
    draws, the magnitude ranges and some operations differ from DALI's auto_aug, so the two loaders
    augment alike in distribution, not pixel for pixel."""

    def __init__(self, policy):
        from torchvision.transforms import v2

        self.name = policy.name
        self.t = {"rand_augment": lambda: v2.RandAugment(num_ops=policy.n, magnitude=policy.m),
                  "trivial_augment": lambda: v2.TrivialAugmentWide(),
                  "auto_augment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)}[policy.name]()

    def _steps(self, rng: np.random.Generator) -> list[tuple[str, int | None, int]]:
        """(operation, magnitude bin, number of bins) to apply, in order."""
        t, ops = self.t, list(self.t._AUGMENTATION_SPACE)
        if self.name == "rand_augment":
            return [(ops[rng.integers(len(ops))], t.magnitude, t.num_magnitude_bins) for _ in range(t.num_ops)]
        if self.name == "trivial_augment":
            return [(ops[rng.integers(len(ops))], int(rng.integers(t.num_magnitude_bins)), t.num_magnitude_bins)]
        sub_policy = t._policies[rng.integers(len(t._policies))]
        return [(op, bin_, 10) for op, probability, bin_ in sub_policy if rng.random() <= probability]

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        t = self.t
        for op, bin_, bins in self._steps(rng):
            magnitudes_fn, signed = t._AUGMENTATION_SPACE[op]
            magnitudes = magnitudes_fn(bins, image.shape[-2], image.shape[-1])
            magnitude = 0.0 if magnitudes is None or bin_ is None else float(magnitudes[bin_])
            if magnitude and signed and rng.random() <= 0.5:
                magnitude = -magnitude
            image = t._apply_image_or_video_transform(image, op, magnitude, interpolation=t.interpolation,
                                                      fill=t._fill)
        return image
