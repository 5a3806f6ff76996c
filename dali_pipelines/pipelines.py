"""DALI pipeline graphs: one definition for training and evaluation, raw pixels or encoded files,
CPU or GPU. Only ``device`` changes between CPU and GPU, so both paths share every operator.

Why ``fn.external_source`` fed from NumPy (and not a DALI reader): CIFAR's raw pixels are a
150 MB memory-mapped uint8 array; gathering a batch of 32x32 images by index costs microseconds,
and only those 3 KB images cross PCIe on a GPU machine, where the upscale to 299x299, the flip,
the normalization and the float conversion then run. The 299x299 float tensors never exist on
the host. Feeding indices we computed ourselves (dali_pipelines/sampling.py) also gives exact
rank sharding, per-epoch reshuffles that are identical on every rank, and augmentation
parameters that are a pure function of (seed, epoch, sample), hence exact mid-epoch resume,
which DALI's readers (random shuffle buffer, own sharding) cannot promise.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines.spec import RESIZE_INTERPOLATION, AutoAugment, Preprocessing

_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}[RESIZE_INTERPOLATION]


def auto_augment_draw_count(policy: AutoAugment) -> int:
    """Uniform numbers per sample that ``policy``'s random choices take (``_HostDraws``):
    RandAugment 2 per operation (which one, the magnitude's sign), TrivialAugment 3, the CIFAR-10
    AutoAugment policy 5 (sub-policy, and per stage whether it runs and the sign)."""
    return max(8, 2 * policy.n)


@pipeline_def
def image_pipeline(source, *, augment: bool, encoded: bool, prep: Preprocessing, dtype: str = "float32",
                   layout: str = "CHW", device: str = "cpu", auto_augment: AutoAugment | None = None):
    """Batches of (normalized images, labels).

    ``source`` returns per batch: images (uint8 HWC arrays, or encoded file bytes), labels and,
    when ``augment``, a (2,) float shift per sample (fraction of the side, zero padded) and an
    int32 flip flag. ``prep``: the output size and mean/std ([0, 1] units, timm's pretrained
    config); a loader at another size (progressive resizing) builds another pipeline.
    ``auto_augment``: a policy of nvidia.dali.auto_aug applied to the uint8 images (after the
    shift, before the normalization and resize); the pipeline must then be built with
    ``enable_conditionals=True`` (DaliLoader does), and ``source`` returns last, per sample,
    ``auto_augment_draw_count(policy)`` float32 uniforms in [0, 1) that make its random choices:
    drawn on the host per (seed, epoch, sample position) like the shift and flip, so one pipeline
    serves every epoch (no rebuild) and a mid-epoch resume replays them exactly.
    """
    image_size = prep.image_size
    num_outputs = (4 if augment else 2) + (auto_augment is not None)
    outputs = fn.external_source(source=source, num_outputs=num_outputs, batch=True,
                                 layout=[None if encoded else "HWC"] + [None] * (num_outputs - 1))
    images, labels = outputs[0], outputs[1]
    # (H, W) per sample for auto-augment's relative translations, read on the host before any
    # upload (no GPU->CPU transition): from the file header, or the raw array's shape.
    hw = None
    if auto_augment is not None:
        hw = (fn.peek_image_shape(images) if encoded else images.shape())[:-1]
    if encoded:
        # fancy upsampling: nvJPEG then upsamples chroma as libjpeg-turbo does, so a model trained
        # on GPU-decoded pixels is served the same pixels by the CPU pipeline (predict.py)
        images = fn.decoders.image(images, device="mixed" if device == "gpu" else "cpu",
                                   output_type=types.RGB, jpeg_fancy_upsampling=True)
    elif device == "gpu":
        images = images.gpu()  # upload the small uint8 image; everything after runs on the GPU
    mirror = 0
    if augment:
        shift, mirror = outputs[2], outputs[3]
        # Random crop with zero padding, expressed as a translation of the whole image so that it
        # means the same thing for 32x32 CIFAR and for folder images of any size.
        # Anchor and shape as arguments: argument inputs live on the CPU, where the shift already
        # is; a GPU operator given them as positional inputs copies them to the host every batch.
        images = fn.slice(images, rel_start=shift, rel_shape=[1.0, 1.0], axis_names="WH",
                          out_of_bounds_policy="pad", fill_values=0)
    if auto_augment is not None:
        images = apply_auto_augment(images, auto_augment, hw, draws=outputs[-1])
    normalize = dict(mirror=mirror, dtype=_DTYPES[dtype], output_layout=layout,
                     mean=[255.0 * m for m in prep.mean], std=[255.0 * s for s in prep.std])
    if encoded:
        # Photos are usually larger than the output: shrink first (uint8, antialiased), then
        # normalize the small result.
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=_INTERP)
        images = fn.crop_mirror_normalize(images, **normalize)
    else:
        # 32x32 sources are upscaled: normalize and flip the tiny image first, so a single
        # resize pass writes the large float output (1.6x faster on CPU than resize-then-
        # normalize, measured with bench/data_throughput.py). Both are linear, so they commute.
        images = fn.crop_mirror_normalize(images, **{**normalize, "dtype": types.FLOAT})
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=_INTERP,
                           antialias=False)
        if dtype != "float32":
            images = fn.cast(images, dtype=_DTYPES[dtype])
    if device == "gpu":
        labels = labels.gpu()
    return images, labels


def apply_auto_augment(images, policy: AutoAugment, shape, draws=None):
    """``policy`` on a batch of uint8 HWC images (CPU or GPU nodes alike). Translations are in
    units of each image's own height and width (``shape``: a CPU node of (H, W) per sample), so
    they mean the same at 32x32 CIFAR as on a large photo; magnitude ranges are DALI's defaults for
    each scheme. ``draws``: a CPU node of per-sample uniforms that replace the policy's random
    operators (``_HostDraws``); None: they draw from the pipeline's seed."""
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    policies = {
        "rand_augment": lambda: rand_augment.rand_augment(images, n=policy.n, m=policy.m, shape=shape),
        "trivial_augment": lambda: trivial_augment.trivial_augment_wide(images, shape=shape),
        "auto_augment": lambda: auto_augment.auto_augment(images, policy_name="reduced_cifar10", shape=shape),
    }
    if policy.name not in policies:
        raise ValueError(f"unknown auto-augment policy {policy.name!r}")
    # DALI 2.4's auto_aug still calls fn.experimental.{filter,equalize}, whose deprecation notices it
    # forces out at every build (each epoch here): dropped, anything else passed on.
    with warnings.catch_warnings(record=True) as caught, _random_from(draws, auto_augment_draw_count(policy)):
        images = policies[policy.name]()
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "fn.experimental." in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return images


class _HostDraws:
    """Stands in for ``fn.random.uniform`` while DALI's auto_aug builds its graph: each of its calls
    (which operation, which sub-policy, whether a stage runs, a magnitude's sign: six call sites in
    DALI 2.4, every one a ``values=range(N)`` choice or a ``range=[lo, hi]`` float) takes the next
    numbers of the per-sample ``draws`` instead of a random operator seeded when the pipeline is
    built. The choices are the same functions of a uniform number; only where it comes from changes."""

    def __init__(self, draws, count: int):
        self.draws, self.count, self.used = draws, count, 0

    def __call__(self, *, values=None, shape=(), dtype=None, seed=None, **kwargs):  # noqa: ARG002 - seed unused
        from nvidia.dali import math as dmath

        bounds = kwargs.pop("range", None)
        if kwargs:
            raise ValueError(f"auto-augment draws: unexpected fn.random.uniform arguments {sorted(kwargs)}")
        if values is not None and list(values) != list(range(len(values))):
            raise ValueError(f"auto-augment draws: values={values!r} is not range({len(values)})")
        size = int(np.prod(shape)) if shape else 1
        if self.used + size > self.count:
            raise ValueError(f"the auto-augment policy takes more than {self.count} draws per sample")
        u = self.draws[self.used] if not shape else self.draws[self.used: self.used + size]
        self.used += size
        if values is not None:
            n = len(values)
            index = dmath.min(dmath.floor(u * float(n)), float(n - 1))  # u * n can round up to n
            return fn.cast(index, dtype=dtype or types.INT32)
        lo, hi = bounds if bounds is not None else (0.0, 1.0)
        out = u * float(hi - lo) + float(lo)
        return out if dtype in (None, types.FLOAT) else fn.cast(out, dtype=dtype)


@contextmanager
def _random_from(draws, count: int):
    """``fn.random.uniform`` is ``_HostDraws(draws)`` inside (the graph is built single-threaded)."""
    if draws is None:
        yield
        return
    import nvidia.dali.fn.random as random_ops

    real = random_ops.uniform
    random_ops.uniform = _HostDraws(draws, count)
    try:
        yield
    finally:
        random_ops.uniform = real
