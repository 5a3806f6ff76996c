"""How long the job's checkpoint of Inception-ResNet-V2's full training state takes to save: what
a spot node's grace period must cover (docs/KUBERNETES.md, "Spot").

    python bench/checkpoint_save.py [--optimizer sgd|adamw] [--repeats 3] [--dir DIR]

Builds timm's inception_resnet_v2 (random weights: the figure depends on sizes, not values) with
the job's 10-class head, takes one optimizer step so the optimizer holds its full state (SGD
momentum, or AdamW's two moments), prepares both with Accelerate on one process, and times the
job's own ``Checkpointer.save`` (Accelerate's save_state in safetensors, the trainer state, the
config, the atomic rename) into ``--dir`` (default: a temporary directory; point it at the
storage the runs volume uses to measure that), then fsyncs its files (what must have reached the
volume before the node goes). Prints, last,
``checkpoint save: S s, on disk after D s (medians of N; ...), SIZE MB``.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    from accelerate import Accelerator

    from job.checkpoint import Checkpointer
    from job.config import load_config
    from job.model import create_model

    cfg = load_config(None, ["model.pretrained=false", f"optim.name={args.optimizer}"])
    model, prep = create_model(cfg.model, num_classes=10, image_size=None)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True) if args.optimizer == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=1e-3))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 299, 299)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()  # the optimizer's state now exists for every parameter
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    parameters = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=args.dir))
    try:
        checkpointer = Checkpointer(accelerator, root, keep=1, config=cfg)
        times, durable, path = [], [], None
        for repeat in range(args.repeats):
            start = time.perf_counter()
            path = checkpointer.save(0, repeat + 1)
            times.append(time.perf_counter() - start)
            # What the save returns with may still sit in the page cache; on the node that is
            # about to vanish only what reached the volume counts: fsync every file.
            for f in path.rglob("*"):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            durable.append(time.perf_counter() - start)
            print(f"save {repeat + 1}: {times[-1]:.2f} s, on disk after {durable[-1]:.2f} s")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        print(f"{cfg.model.name}: {parameters / 1e6:.1f} M parameters, optimizer {args.optimizer}, into {root}")
        print(f"checkpoint save: {statistics.median(times):.2f} s, on disk after {statistics.median(durable):.2f} s "
              f"(medians of {args.repeats}; min {min(times):.2f} s / {min(durable):.2f} s), {size:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
