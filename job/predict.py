"""Top-5 classes of image files with a finished run's best model; one JSON line per image.

    python job/predict.py --run runs/demo path/to/cat.jpg path/to/ship.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import numpy as np
import torch

from dali_pipelines.loader import image_loader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec
from job.config import ConfigError, positive_int
from job.data import IMAGE_EXTENSIONS, check_image
from job.distributed import resolve_device, resolve_precision
from job.evaluate import serving_loader, trained_config
from job.model import WeightsError, load_trained
from job.run_dir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a training run")
    parser.add_argument("images", nargs="+", help=f"image files ({', '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    try:
        device = torch.device(resolve_device(args.device))
        run = RunDir(args.run)
        trained = trained_config(run)  # the run's precision, threads and loader
        model, card = load_trained(run)
    except (ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in args.images:
        problem = None if Path(path).is_file() else f"{path}: no such file"
        problem = problem or check_image(path)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    # The same evaluation pipeline as training: identical decode, resize and normalization.
    precision = resolve_precision(trained.train.mixed_precision, device.type)
    spec = LoaderSpec.for_run(card.preprocessing, num_threads=trained.data.num_threads, device=device,
                              precision=precision, loader=serving_loader(trained),
                              say=lambda line: print(line, file=sys.stderr))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision != "no")
    loader = image_loader(spec, labels=np.zeros(len(args.images), dtype=np.int64), files=args.images, train=False,
                          shard=Shard(batch_size=32))
    model.to(device)
    k = min(args.top, card.num_classes)
    paths = iter(args.images)
    with torch.no_grad(), autocast:
        for images, _ in loader:
            top = model(images.to(device)).float().softmax(dim=1).topk(k, dim=1)
            for p, idx in zip(top.values.tolist(), top.indices.tolist()):
                print(json.dumps({"image": next(paths), "top": [{"class": card.classes[i], "probability": round(q, 6)}
                                                                for i, q in zip(idx, p)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
