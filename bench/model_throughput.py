"""Training-step throughput of the model alone (synthetic tensors already on the device), to set
against the data pipeline's images/s: the pipeline must deliver several times what the model eats.

    python bench/model_throughput.py --model inception_resnet_v2 --size 299 --batch-size 64 --precision bf16
Prints one line: `model images/s = X` (per device).
"""
from __future__ import annotations

import argparse
import time


import torch

from job.config import load_config
from job.model import create_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="inception_resnet_v2")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(None, [f"model.name={args.model}", "model.pretrained=false"])
    model, _ = create_model(cfg.model, 10)
    model = model.to(device).train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[args.precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = args.steps * args.batch_size / (time.perf_counter() - start)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{args.model} {args.size}px batch {args.batch_size} {args.precision} on {name}")
    print(f"model images/s = {rate:.1f}")


if __name__ == "__main__":
    main()
