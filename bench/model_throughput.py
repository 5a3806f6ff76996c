"""Training-step throughput of the model alone (synthetic tensors already on the device), to set
against the data pipeline's images/s, and the per-device batch that runs it fastest.

    python bench/model_throughput.py --model inception_resnet_v2 --size 299 --batch-size 32 64 128 256 --precision bf16

For each batch size: images/s over steady-state steps (warm-up steps skipped, the device
synchronised at the window's edges), model FLOPs per training image (forward + backward, counted
by torch.utils.flop_counter), model FLOPs utilisation and peak memory. ``cudnn.benchmark`` is set
as training sets it. The last line names the fastest batch: ``fastest batch = B``.

MFU has two denominators, both printed: the card's datasheet dense peak at this precision
(``DATASHEET_DENSE_TFLOPS``; ``--peak-tflops`` overrides it, and is needed for a card not in the
table), the figure MFU is usually quoted against; and the measured rate of a warmed 8192^3 matmul
(>= 1 s of matmuls first, so the SM clock has left its idle 345 MHz), what this card reaches here.
A short 4096^3 timing after one warm-up, the old denominator, read low and made MFU 1.25-2x too kind.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import time

import torch

from job.config import load_config
from job.model import create_model

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}

# Dense (no 2:4 sparsity) bf16 = fp16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched
# in this order against torch.cuda.get_device_name() (so "H100 PCIe" before "H100", "A100" before
# "A10"). SXM parts unless named; "A10G" is AWS's A10 variant. fp32 runs ("no") have no entry: give
# --peak-tflops.
DATASHEET_DENSE_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200 NVL", 835.0), ("H200", 989.0), ("GH200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800 PCIe", 756.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A40", 150.0), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("RTX A6000", 155.0),
]


def datasheet_tflops(device_name: str, precision: str) -> float | None:
    """The datasheet dense peak of ``device_name`` at ``precision`` (bf16 or fp16), None if unknown."""
    if precision not in ("bf16", "fp16"):
        return None
    for key, tflops in DATASHEET_DENSE_TFLOPS:
        if key in device_name:
            return tflops
    return None


def mfu(images_per_second: float, flops_per_image: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over ``peak_tflops`` (None without one)."""
    if not peak_tflops:
        return None
    return images_per_second * flops_per_image / (peak_tflops * 1e12)


def matmul_tflops(device: torch.device, dtype: torch.dtype | None, n: int = 8192, warmup_seconds: float = 1.0,
                  seconds: float = 1.0) -> float:
    """What this device reaches at this precision: an n^3 matmul timed over ``seconds`` after
    ``warmup_seconds`` of the same matmuls (GPU clocks ramp up from idle under load)."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    start = _now(device)
    while _now(device) - start < warmup_seconds:
        for _ in range(4):
            a @ b
    repeats, start = 0, _now(device)
    while True:
        for _ in range(4):
            a @ b
        repeats += 4
        elapsed = _now(device) - start
        if elapsed >= seconds:
            return 2 * n ** 3 * repeats / elapsed / 1e12


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(model, opt, batch: int, args: argparse.Namespace, device: torch.device,
            flops_per_image: float | None = None) -> dict:
    """One batch size: FLOPs per image (one counted step, unless already known: they do not depend
    on the batch), then steady-state images/s."""
    dtype, size, steps = _DTYPES[args.precision], args.size, args.steps
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    if flops_per_image is None:
        with FlopCounterMode(display=False) as counter:
            step()
        flops_per_image = counter.get_total_flops() / batch
    for _ in range(args.warmup):  # start-up, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = _now(device)
    for _ in range(steps):
        step()
    seconds = _now(device) - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_second": steps * batch / seconds, "flops_per_image": flops_per_image,
            "peak_memory_gib": peak}


class _CountOps:
    """Aten operators dispatched (each is at least one kernel launch on a GPU), by kind."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Counter(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.total = self.dense = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.total += 1
                name = func._overloadpacket.__name__
                self.dense += name.startswith(("convolution", "mm", "addmm", "bmm", "cudnn_convolution"))
                return func(*args, **(kwargs or {}))

        return Counter()


def host_overhead(args: argparse.Namespace) -> None:
    """Host time of one training step with the compute made small: the model on CPU at a tiny
    input size and a few batch sizes, the step time fitted as host + batch x compute (least
    squares); the intercept is the per-step cost that does not shrink with the batch (Python,
    dispatcher, autograd, per-op set-up), the part a GPU cannot hide when it is launch-bound.
    The optimizer runs its foreach kernels as it does on CUDA. Also: aten operators per step
    (convolutions and matmuls apart: what torch.compile leaves as library calls; the rest is what
    it fuses) and the model's training FLOPs per image at ``--flops-size`` (counted on the meta
    device, nothing computed)."""
    import statistics

    torch.set_num_threads(1)  # one core: steadier on a shared machine
    cfg = load_config(None, [f"model.name={args.model}", "model.pretrained=false"])
    model, _ = create_model(cfg.model, 10)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)

    def step(x, y):  # forward and backward: the optimizer's work does not scale with the batch
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    inputs = {b: (torch.randn(b, 3, args.size, args.size), torch.randint(0, 10, (b,))) for b in args.batch_size}
    counts = {}
    for batch, (x, y) in inputs.items():
        step(x, y)
        counts[batch] = _CountOps()
        with counts[batch]:
            step(x, y)
    # Batch sizes interleaved and the fastest of each kept: on a shared machine the other loads
    # only ever add time, and a burst of them then hits every batch size alike.
    runs = {b: [] for b in inputs}
    for _ in range(args.steps):
        for batch, (x, y) in inputs.items():
            start = time.perf_counter()
            step(x, y)
            runs[batch].append(time.perf_counter() - start)
    times = [min(runs[b]) for b in args.batch_size]
    for batch, seconds in zip(args.batch_size, times):
        print(f"batch {batch} at {args.size} px: {seconds * 1e3:.1f} ms per step (fastest of {args.steps}), "
              f"{counts[batch].total} aten ops ({counts[batch].dense} convolutions and matmuls)")
    counter = counts[args.batch_size[-1]]
    slope, host = statistics.linear_regression(args.batch_size, times)
    print(f"host time per forward + backward (intercept) = {host * 1e3:.1f} ms, {host / counter.total * 1e6:.1f} us "
          f"per aten op; compute {slope * 1e3:.1f} ms per image at {args.size} px")
    x, y = inputs[args.batch_size[0]]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the first step creates the momentum buffers; count a steady one
    optimizer_ops = _CountOps()
    with optimizer_ops:
        opt.step()
    print(f"optimizer step (SGD, foreach) = {optimizer_ops.total} aten ops")
    with torch.device("meta"):
        meta_model, _ = create_model(cfg.model, 10)
    meta_model.train()
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, args.flops_size, args.flops_size, device="meta")
    with FlopCounterMode(display=False) as flops:
        torch.nn.functional.cross_entropy(meta_model(x), torch.zeros(2, dtype=torch.long, device="meta")).backward()
    print(f"training FLOPs per image at {args.flops_size} px = {flops.get_total_flops() / 2 / 1e9:.1f} GFLOP")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="inception_resnet_v2")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch-size", type=int, nargs="+", default=[64])
    p.add_argument("--precision", choices=tuple(_DTYPES), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak at this precision (datasheet); default: DATASHEET_DENSE_TFLOPS")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the measured matmul (default 8192 on a GPU, 512 on CPU)")
    p.add_argument("--host-overhead", action="store_true",
                   help="CPU: the step's host time and aten ops with the compute made small (host_overhead)")
    p.add_argument("--flops-size", type=int, default=299, help="--host-overhead: image size of the FLOP count")
    args = p.parse_args()
    if args.host_overhead:
        host_overhead(args)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as job/distributed.py sets it for training
    cfg = load_config(None, [f"model.name={args.model}", "model.pretrained=false"])
    model, _ = create_model(cfg.model, 10)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dtype = _DTYPES[args.precision]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    datasheet = args.peak_tflops or datasheet_tflops(name, args.precision)
    gpu = device.type == "cuda"
    n = args.matmul_size or (8192 if gpu else 512)
    measured = matmul_tflops(device, dtype, n=n, warmup_seconds=1.0 if gpu else 0.1, seconds=1.0 if gpu else 0.2)
    sheet = (f"{datasheet:.1f} TFLOP/s ({'--peak-tflops' if args.peak_tflops else 'datasheet, dense'})"
             if datasheet else f"unknown for {name} at {args.precision} (give --peak-tflops)")
    denominators = f"peak {sheet}; measured {n}^3 matmul {measured:.3g} TFLOP/s"
    print(f"{args.model} {args.size}px {args.precision} on {name}; {denominators}")
    best, flops_per_image = None, None
    for batch in args.batch_size:
        try:
            r = measure(model, opt, batch, args, device, flops_per_image)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            torch.cuda.empty_cache()
            continue
        flops_per_image = r["flops_per_image"]
        of_peak = mfu(r["images_per_second"], r["flops_per_image"], datasheet)
        of_matmul = mfu(r["images_per_second"], r["flops_per_image"], measured)
        print(f"batch {batch}: model images/s = {r['images_per_second']:.1f}, "
              f"{r['flops_per_image'] / 1e9:.3g} GFLOP/image, MFU {_percent(of_peak)} of peak "
              f"({_percent(of_matmul)} of measured matmul), peak memory "
              f"{'n/a (CPU)' if r['peak_memory_gib'] is None else format(r['peak_memory_gib'], '.1f') + ' GiB'}")
        if best is None or r["images_per_second"] > best[1]:
            best = (batch, r["images_per_second"])
    if best is not None:
        print(f"fastest batch = {best[0]} ({best[1]:.1f} images/s)")
    print(f"MFU denominators: {denominators}")


if __name__ == "__main__":
    main()
