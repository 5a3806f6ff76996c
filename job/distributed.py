"""Where the job runs: device choice (never a silent CPU fallback), precision, the Accelerator,
collective timeouts, and doing per-node work (data preparation, Hub downloads) once per node."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import zlib
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from job.components import Component
from job.config import ConfigError, TimeoutsConfig, TrainConfig

T = TypeVar("T")
DRIVER_HINT = ("the CUDA 13 builds of PyTorch and DALI need NVIDIA driver R580 or newer (check `nvidia-smi`); "
               "update the node's driver, use an image built for the node's CUDA version, or set "
               "train.device=cpu to train on CPU on purpose")


def visible_gpus() -> list[str]:
    """GPUs this machine claims to have, whether or not CUDA can use them: ``nvidia-smi -L``,
    else the container runtime's NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES."""
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            gpus = [line for line in listing.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
        except (OSError, subprocess.SubprocessError):
            pass
    for var in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var, "").strip()
        if value and value not in ("void", "none", "-1", "NoDevFiles"):
            return [f"{var}={value}"]
    return []


def resolve_device(choice: str) -> str:
    """``cuda`` or ``cpu`` for ``train.device``; a machine with GPUs that CUDA cannot use is an
    error, not a run that silently trains on CPU while the launcher started one process per GPU."""
    cuda = torch.cuda.is_available()
    if choice == "cpu":
        return "cpu"
    if cuda:
        return "cuda"
    if choice == "cuda":
        raise ConfigError(f"train.device=cuda but CUDA is not usable here (torch {torch.__version__}, built for "
                          f"CUDA {torch.version.cuda}); {DRIVER_HINT}")
    gpus = visible_gpus()
    if gpus:
        raise ConfigError(f"this machine shows GPUs ({'; '.join(gpus[:2])}) but CUDA is not usable "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); {DRIVER_HINT}")
    return "cpu"


# The CPU features that compute bf16 natively (oneDNN's bf16 kernels): x86's AVX512-BF16 and
# AMX-BF16, ARM's BF16 and SVE-BF16 extensions; as torch.cpu.get_capabilities() names them.
CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
# The same features as /proc/cpuinfo spells them ("flags" on x86, "Features" on ARM).
_CPUINFO_BF16 = {"avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16", "bf16": "bf16", "svebf16": "sve_bf16"}


def cpu_bf16_features() -> tuple[str, ...]:
    """The native-bf16 features of this CPU (``CPU_BF16_FEATURES``); empty where bf16 would be
    emulated through fp32 units. torch's own probe (``torch.cpu.get_capabilities``, from cpuinfo),
    else, on a torch without it, the kernel's flags."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        try:
            found = probe()
            return tuple(name for name in CPU_BF16_FEATURES if found.get(name))
        except Exception:  # noqa: BLE001 - a probe that fails says nothing: read the flags instead
            pass
    flags = set()
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(dict.fromkeys(_CPUINFO_BF16[f] for f in flags if f in _CPUINFO_BF16))


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name, for messages."""
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_precision(choice: str, device: str, *, source: str | None = None) -> str:
    """Accelerate's ``mixed_precision`` for ``train.mixed_precision`` on ``device``.

    ``auto`` = bf16 on GPUs that compute it natively (Ampere and newer), else full precision: on
    older GPUs bf16 is emulated and slower than fp32. On CPUs ``auto`` is fp32 even where bf16 is
    native: bf16 autocast has not measured clearly faster than fp32 in channels_last on CPU, and
    it costs exactness (docs/BENCHMARKS.md, "bf16 on CPU").

    Asked for explicitly on a CPU, a precision it cannot run as asked is a ConfigError (exit 2)
    before any data or model is touched: bf16 without AVX512-BF16 / AMX-BF16 (emulated, slower
    than fp32), and fp16 always (Accelerate autocasts and scales fp16 on GPUs only: the run would
    compute fp32 while its config, records and feature cache said fp16). ``source`` names the file
    the value came from (a finished run's config.yaml, for evaluate/predict)."""
    if choice == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    if device == "cpu" and choice in ("bf16", "fp16"):
        _check_cpu_precision(choice, source)
    return choice


def _check_cpu_precision(choice: str, source: str | None) -> None:
    where = f"{source}: " if source else ""
    # A finished run read by evaluate.py/predict.py takes the value from its config.yaml.
    fix = (f"set train.mixed_precision=no (mixed_precision: no under train: in {source})" if source else
           "set train.mixed_precision=no (evaluating or predicting with a finished run: in its config.yaml)")
    if choice == "fp16":
        raise ConfigError(f"{where}train.mixed_precision=fp16 on CPU: Accelerate autocasts and loss-scales fp16 on "
                          "GPUs only, so this run would compute in fp32 while its config and records said fp16; "
                          f"{fix}, or run on a GPU")
    if not cpu_bf16_features():
        raise ConfigError(f"{where}train.mixed_precision=bf16 on CPU, but this CPU ({cpu_name()}) has no native "
                          "bf16: it lacks AVX512-BF16 and AMX-BF16 (ARM: BF16), so bf16 would be emulated, slower "
                          f"than fp32; {fix}, or run on a GPU or a CPU with AVX512-BF16 / AMX-BF16")


# DistributedDataParallel's options: its defaults (buffers broadcast, gradients copied into the
# buckets, all-reduced in their own dtype) until a cluster run measures a better choice; never the
# unused-parameter walk: two_stage runs its frozen stage through a head-only wrapper (head_only_step).
DDP_OPTIONS = {"gradient_as_bucket_view": False, "broadcast_buffers": True}


def build_accelerator(cfg: TrainConfig, timeouts: TimeoutsConfig) -> Accelerator:
    device = resolve_device(cfg.device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
    return Accelerator(
        cpu=device == "cpu",  # also what makes N CPU processes use gloo instead of each running alone
        mixed_precision=resolve_precision(cfg.mixed_precision, device),
        kwargs_handlers=[
            DistributedDataParallelKwargs(**DDP_OPTIONS),
            # Long enough for the other ranks to wait while the main process prepares data,
            # downloads weights or compiles; shortened by training_timeouts() once training runs.
            InitProcessGroupKwargs(timeout=timedelta(minutes=timeouts.setup_minutes)),
        ],
    )


def training_timeouts(accelerator: Accelerator, timeouts: TimeoutsConfig) -> None:
    """From now on a collective that waits longer than ``timeouts.step_minutes`` fails the rank (a
    peer died or its pod was lost): the job exits and restarts from its checkpoint. Called after
    the first optimizer update, so that compilation (``torch.compile`` compiles in the first
    step) and cuDNN autotuning still run under the setup timeout."""
    _set_timeout(accelerator, timeouts.step_minutes)


def setup_timeouts(accelerator: Accelerator, timeouts: TimeoutsConfig) -> None:
    """Back to the generous setup timeout, for a step that may compile again (the ``two_stage``
    unfreeze changes what needs gradients: a compiled model recompiles in its first step)."""
    _set_timeout(accelerator, timeouts.setup_minutes)


def _set_timeout(accelerator: Accelerator, minutes: float) -> None:
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        set_group_timeout(timedelta(minutes=minutes))


def set_group_timeout(timeout: timedelta) -> None:
    """The default process group's collective timeout, on every torch the project allows.

    ``torch.distributed.set_timeout`` is public from torch 2.14 on. Before it (2.5 to 2.13) the
    same change is each backend's ``_set_default_timeout``, which those versions'
    ``distributed_c10d._set_pg_timeout`` calls for the group's gloo and NCCL backends; called
    directly here because 2.14 deprecates ``_set_pg_timeout`` (tests/test_distributed_correctness.py
    runs two processes through their first update with ``set_timeout`` removed)."""
    public = getattr(torch.distributed, "set_timeout", None)
    if public is not None:
        public(timeout)
        return
    group = torch.distributed.group.WORLD
    for device in group._device_types:
        group._get_backend(device)._set_default_timeout(timeout)


class CollectiveTimeouts(Component):
    """``timeouts:``: compilation and autotuning happen in the first step, under the generous setup
    timeout; from the first update on, a collective that waits longer than the step timeout means a
    lost peer. A compiled model that unfreezes its backbone recompiles: the setup timeout again
    until the next update."""

    name = "timeouts"

    def __init__(self, accelerator: Accelerator, cfg: TimeoutsConfig, compiled: bool):
        self.accelerator, self.cfg, self.compiled = accelerator, cfg, compiled
        self.short = False

    def on_update(self, step: int) -> None:
        if self.short:
            return
        training_timeouts(self.accelerator, self.cfg)
        self.short = True
        if self.accelerator.num_processes > 1:
            self.accelerator.print(f"collective timeout now {collective_timeout()} (timeouts.step_minutes)")

    def on_freeze_change(self, frozen: bool) -> None:
        if self.compiled and self.short:
            setup_timeouts(self.accelerator, self.cfg)
            self.short = False


def collective_timeout() -> timedelta | None:
    """The default process group's current timeout (None without one): what a rank waits in a
    collective before it fails. Logged, and read back by the tests."""
    if not torch.distributed.is_initialized():
        return None
    group = torch.distributed.group.WORLD
    device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    return group._get_backend(device).options._timeout


def wrap_for_training(accelerator: Accelerator, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      compile: bool) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.optim.Optimizer]:
    """``(what to call, the DDP module or None, the prepared optimizer)`` for ``module``.

    Compiled here rather than by Accelerate's dynamo plugin: the DDP module stays reachable, so
    its ``no_sync`` still skips the gradient all-reduce on accumulation micro-batches (a compiled
    wrapper has no ``no_sync``), and freezing, saving and evaluation keep using the bare module,
    never the wrapper (no ``_orig_mod.``/``module.`` prefixes in saved weights).
    """
    prepared, optimizer = accelerator.prepare(module, optimizer)
    ddp = prepared if isinstance(prepared, torch.nn.parallel.DistributedDataParallel) else None
    return (torch.compile(prepared) if compile else prepared), ddp, optimizer


SYNC_BATCHNORM_BELOW = 32  # per-process batch under which auto synchronises batch-norm statistics


def use_sync_batchnorm(choice: str, batch_size: int, num_processes: int, device_type: str) -> bool:
    """``ddp.sync_batchnorm``: ``auto`` = more than one GPU process, each with fewer than 32
    images per batch (BN statistics of 16 images on each of 16 GPUs, against 256 on one GPU). One
    process has nothing to synchronise."""
    if num_processes < 2 or choice == "false":
        return False
    if choice == "true":
        return True
    return device_type == "cuda" and batch_size < SYNC_BATCHNORM_BELOW


def sync_batchnorm(accelerator: Accelerator, model: torch.nn.Module, choice: str, batch_size: int) -> int:
    """Convert ``model``'s batch norms in place (before DDP wraps it) when ``use_sync_batchnorm``
    says so; the number converted. The parameter and buffer objects stay the same (the optimizer
    and the weight EMA keep theirs; state_dict keys do not change). GPUs: timm's
    ``convert_sync_batchnorm`` (torch's SyncBatchNorm, timm's SyncBatchNormAct for its fused
    BN + activation layers). CPU processes: torch's SyncBatchNorm refuses CPU tensors, so each
    layer's training forward takes the same global statistics from an all-reduce over gloo
    (``_all_reduce_batch_norm``): what tests/test_sync_batchnorm.py checks on two processes."""
    device_type = accelerator.device.type
    if not use_sync_batchnorm(choice, batch_size, accelerator.num_processes, device_type):
        return 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if device_type == "cuda":
        from timm.layers import convert_sync_batchnorm

        if convert_sync_batchnorm(model) is not model:
            raise ValueError("sync_batchnorm converts the children of a network, not a lone batch norm")
    else:
        from types import MethodType

        for norm in norms:
            norm.forward = MethodType(_all_reduce_batch_norm, norm)
    accelerator.print(f"ddp.sync_batchnorm={choice}: {len(norms)} batch norms take their statistics over all "
                      f"{accelerator.num_processes} processes ({batch_size} images each)")
    return len(norms)


def _all_reduce_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
    """A batch norm's training forward with the statistics of the global batch (one all-reduce of
    the per-channel sums, sums of squares and count; its backward all-reduces their gradients, as
    SyncBatchNorm's does). Evaluation and single-process calls: the layer's own forward."""
    if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return type(self).forward(self, x)
    from torch.distributed.nn.functional import all_reduce

    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, channels] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.full((1,), xf.numel() / channels, dtype=torch.float32, device=x.device)
    sums = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
    n = sums[-1]
    mean = sums[:channels] / n
    var = (sums[channels: 2 * channels] / n - mean * mean).clamp_min(0)  # biased, as BN normalises with
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), momentum)  # unbiased, as BN stores
    y = y.to(x.dtype)
    if hasattr(self, "act"):  # timm's BatchNormAct2d: then its dropout and activation
        y = self.act(self.drop(y))
    return y


class FrozenBackboneStep(torch.nn.Module):
    """``head(backbone.forward_features(x))`` with the backbone run without autograd and only
    the head in a DDP wrapper: two_stage's first stage synchronises the head's gradients alone,
    with no unused-parameter walk and no zero-filled backbone gradients on the wire. The full
    wrapper (built while everything required gradients, so the backbone is registered) takes over
    at the unfreeze; each wrapper's hooks are idle while the other one runs the forward."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone.forward_features(x)
        return self.head(features)


def head_only_step(accelerator: Accelerator, bare: torch.nn.Module, cfg: TrainConfig):
    """``(what to call, the head's DDP module)`` for two_stage's frozen stage (FrozenBackboneStep)."""
    device = accelerator.device
    ddp = torch.nn.parallel.DistributedDataParallel(
        bare.head, device_ids=[device.index or 0] if device.type == "cuda" else None, **DDP_OPTIONS)
    step = FrozenBackboneStep(bare.backbone, ddp)
    return (torch.compile(step) if cfg.compile else step), ddp


def all_ranks_or_none(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """``work()`` on every rank; if it raised on any rank, raise on all of them (the others would
    otherwise wait in their next collective until the timeout). Work that only the main process
    does (starting W&B) fails everywhere at once."""
    error = None
    try:
        result = work()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    failed = accelerator.reduce(torch.tensor([0.0 if error is None else 1.0], device=accelerator.device), "sum")
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError("another process failed during setup (its error is in its log)")
    return result


def once_per_node_first(accelerator: Accelerator, work: Callable[[], T]) -> T:
    """Run ``work`` on the global main process, then on each other node's local main process,
    then everywhere else; return its result on every rank.

    For work that writes a shared or node-local cache and is cheap to repeat once the cache is
    there (preparing the data store, downloading weights): on shared storage the later calls
    reuse the main process's result; on node-local storage each node builds its own once,
    instead of every rank racing on the same temporary files.
    """
    if accelerator.is_main_process:
        result = work()
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process and not accelerator.is_main_process:
        result = work()
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        result = work()
    return result


def replicas_identical(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (what DDP promises): one CRC32 per tensor,
    gathered. Logged at the end of every multi-process run; a mismatch is a bug worth a loud line."""
    # reshape(-1) first: a channels_last 1x1 convolution weight is "contiguous" with a stride of C
    # in its size-1 last dimension, which .view(torch.uint8) refuses (tests/test_presets_e2e.py)
    crcs = [zlib.crc32(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            for p in model.parameters()]
    mine = torch.tensor(crcs, dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine).view(accelerator.num_processes, -1).cpu().numpy()
    same = bool(np.all(every == every[0]))
    accelerator.print(f"replicas {'identical' if same else 'DIFFER'}: {every.shape[1]} parameter tensors "
                      f"compared across {accelerator.num_processes} processes")
    return same
