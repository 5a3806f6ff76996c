"""Evaluate a finished run's best model on its test (or val) split; prints one JSON object.

    python job/evaluate.py --run runs/demo [--split test|val]
    accelerate launch --multi_gpu --num_processes 2 job/evaluate.py --run runs/demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator

from dali_pipelines.loader import LoaderSpec, dali_device_id, make_loader
from job.data import DataError, load_store
from job.loop import evaluate
from job.model import WeightsError, load_trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a training run")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--batch-size", type=int, default=128, help="images per process per step")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        model, meta = load_trained(args.run)
        store = load_store(meta["store"])
        spec = LoaderSpec(image_size=meta["image_size"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                          device_id=dali_device_id(accelerator.device))
        loader = make_loader(store, args.split, spec, train=False, batch_size=args.batch_size,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, seed=0)
    except (DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate(model.to(accelerator.device), loader, accelerator, meta["num_classes"])
    if accelerator.is_main_process:
        print(json.dumps({"run": args.run, "split": args.split, "accuracy": result["accuracy"],
                          "loss": result["loss"], "samples": result["samples"],
                          "world_size": accelerator.num_processes,
                          "per_class_accuracy": dict(zip(meta["classes"], result["per_class_accuracy"]))}))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
