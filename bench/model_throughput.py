"""Training-step throughput of the model alone (synthetic tensors already on the device), to set
against the data pipeline's images/s, and the per-device batch that runs it fastest.

    python bench/model_throughput.py --model inception_resnet_v2 --size 299 --batch-size 32 64 128 256 --precision bf16

For each batch size: images/s over steady-state steps (warm-up steps skipped, the device
synchronised at the window's edges), model FLOPs per training image (forward + backward, counted
by torch.utils.flop_counter), model FLOPs utilisation against the device's peak (``--peak-tflops``,
else a measured large-matmul rate at the same precision) and peak memory. ``cudnn.benchmark`` is
set as training sets it. The last line names the fastest batch: ``fastest batch = B``.
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


def matmul_tflops(device: torch.device, dtype: torch.dtype | None, n: int = 4096, repeats: int = 10) -> float:
    """A large matmul's rate: what this device reaches at this precision (the MFU denominator
    when the card's datasheet peak is not given)."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    a @ b
    start = _now(device)
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (_now(device) - start) / 1e12


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(model, opt, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """One batch size: FLOPs per image (one counted step), then steady-state images/s."""
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

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(args.warmup):  # start-up, cuDNN autotuning
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = _now(device)
    for _ in range(steps):
        step()
    seconds = _now(device) - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_second": steps * batch / seconds, "flops_per_image": counter.get_total_flops() / batch,
            "peak_memory_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="inception_resnet_v2")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch-size", type=int, nargs="+", default=[64])
    p.add_argument("--precision", choices=tuple(_DTYPES), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak at this precision (datasheet); default: a measured matmul rate")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as job/distributed.py sets it for training
    cfg = load_config(None, [f"model.name={args.model}", "model.pretrained=false"])
    model, _ = create_model(cfg.model, 10)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    dtype = _DTYPES[args.precision]
    peak = args.peak_tflops or matmul_tflops(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.model} {args.size}px {args.precision} on {name}; peak {peak:.1f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'measured matmul'})")
    best = None
    for batch in args.batch_size:
        try:
            r = measure(model, opt, batch, args, device)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            torch.cuda.empty_cache()
            continue
        mfu = r["images_per_second"] * r["flops_per_image"] / (peak * 1e12)
        print(f"batch {batch}: model images/s = {r['images_per_second']:.1f}, "
              f"{r['flops_per_image'] / 1e9:.2f} GFLOP/image, MFU {mfu:.1%}, peak memory "
              f"{'n/a (CPU)' if r['peak_memory_gib'] is None else format(r['peak_memory_gib'], '.1f') + ' GiB'}")
        if best is None or r["images_per_second"] > best[1]:
            best = (batch, r["images_per_second"])
    if best is not None:
        print(f"fastest batch = {best[0]} ({best[1]:.1f} images/s)")


if __name__ == "__main__":
    main()
