"""Top-5 classes of image files with a finished run's best model, or with an ONNX file that
``python -m job.export`` wrote; one JSON line per image.

    python job/predict.py --run runs/demo path/to/cat.jpg path/to/ship.png
    python job/predict.py --onnx runs/demo/exports/model.onnx cat.jpg ship.png
    python job/predict.py --run runs/demo --onnx runs/demo/exports/model.onnx cat.jpg   # the export vs its run

With both, the lines are the ONNX model's, and one line on stderr says how the two agree (top-1
and the largest probability difference).
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
from job.model import WeightsError
from job.run_dir import RunDir, load_trained


def run_probabilities(run_path: str, images: list[str], device_choice: str) -> tuple[np.ndarray, list[str]]:
    """(images, classes) probabilities of the run's best model through the training's evaluation
    pipeline: identical decode, resize and normalization, the run's own precision."""
    device = torch.device(resolve_device(device_choice))
    run = RunDir(run_path)
    trained = trained_config(run)  # the run's precision, threads and loader
    # Before the model is read: a precision this device cannot run is refused (exit 2), as in training.
    precision = resolve_precision(trained.train.mixed_precision, device.type,
                                  source=str(run.config_file) if run.config_file.is_file() else None)
    model, card = load_trained(run)
    spec = LoaderSpec.for_run(card.preprocessing, num_threads=trained.data.num_threads, device=device,
                              precision=precision, loader=serving_loader(trained),
                              say=lambda line: print(line, file=sys.stderr))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision != "no")
    loader = image_loader(spec, labels=np.zeros(len(images), dtype=np.int64), files=images, train=False,
                          shard=Shard(batch_size=32))
    model.to(device)
    batches = []
    with torch.no_grad(), autocast:
        for x, _ in loader:
            batches.append(model(x.to(device)).float().softmax(dim=1).cpu().numpy())
    return np.concatenate(batches), card.classes


def onnx_probabilities(onnx_file: str, images: list[str]) -> tuple[np.ndarray, list[str]]:
    """(images, classes) probabilities of an exported ONNX file under onnxruntime, fed the decoded
    uint8 RGB pixels as they are (the resize and normalization are inside the file); images of
    the same size go together, 32 at a time."""
    from PIL import Image

    from job.export import load_onnx

    session, classes = load_onnx(onnx_file)
    pixels = []
    for path in images:
        with Image.open(path) as im:
            pixels.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    probs = np.zeros((len(images), len(classes)), dtype=np.float32)
    by_size: dict[tuple, list[int]] = {}
    for i, p in enumerate(pixels):
        by_size.setdefault(p.shape, []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), 32):
            chunk = indices[start:start + 32]
            probs[chunk] = session.run(None, {"images": np.stack([pixels[i] for i in chunk])})[0]
    return probs, classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="output_dir of a training run")
    parser.add_argument("--onnx", metavar="FILE", help="an ONNX file written by `python -m job.export`")
    parser.add_argument("images", nargs="+", help=f"image files ({', '.join(IMAGE_EXTENSIONS)})")
    parser.add_argument("--top", type=positive_int, default=5, help="classes shown per image")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    args = parser.parse_args(argv)
    if not args.run and not args.onnx:
        parser.error("give --run DIR, --onnx FILE, or both (to check an export against its run)")
    from job.export import ExportError

    try:
        for path in args.images:
            problem = None if Path(path).is_file() else f"{path}: no such file"
            problem = problem or check_image(path)
            if problem:
                raise ConfigError(problem)
        if args.onnx:
            probs, classes = onnx_probabilities(args.onnx, args.images)
        if args.run:
            run_probs, run_classes = run_probabilities(args.run, args.images, args.device)
            if args.onnx and run_classes != classes:
                raise ExportError(f"{args.onnx} has classes {classes}, the run {args.run} {run_classes}: "
                                  "it is not an export of this run")
            if not args.onnx:
                probs, classes = run_probs, run_classes
    except (ConfigError, WeightsError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    k = min(args.top, len(classes))
    for path, row in zip(args.images, probs):
        idx = np.argsort(-row, kind="stable")[:k]
        print(json.dumps({"image": path, "top": [{"class": classes[i], "probability": round(float(row[i]), 6)}
                                                 for i in idx]}))
    if args.onnx and args.run:
        agree = int((probs.argmax(axis=1) == run_probs.argmax(axis=1)).sum())
        difference = float(np.abs(probs - run_probs).max())
        print(json.dumps({"onnx_vs_run": {"images": len(args.images), "top1_agree": agree,
                                          "max_probability_difference": difference}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
