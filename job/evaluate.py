"""Evaluate a finished run's best model on its test (or val) split; prints one JSON object.

    python job/evaluate.py --run runs/demo [--split test|val] [--store data/prepared/cifar10] [--image-size 160]
    accelerate launch --multi_gpu --num_processes 2 job/evaluate.py --run runs/demo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dali_pipelines.loader import make_loader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec
from job.config import MAX_IMAGE_SIZE, BadInput, Config, ConfigError, positive_int
from job.data import DataError, load_store
from job.distributed import build_accelerator
from job.loop import evaluate
from job.model import WeightsError, check_input_size, preprocessing
from job.run_dir import RunDir, load_trained


def trained_config(run: RunDir) -> Config:
    """The config the run trained with (its precision, threads, loader); the defaults for a run
    folder without one (``--store`` then says where the data is)."""
    return run.config() if run.config_file.is_file() else Config()


def serving_loader(trained: Config) -> str:
    """The run's loader, falling back from DALI to the torch loader where DALI is not installed
    (same batches within rounding: evaluation should not need the training machine's packages)."""
    return "torch" if trained.data.loader == "torch" else "auto"


def store_of_run(run: RunDir) -> Path:
    """The prepared store a run trained on, from its resolved config (relative paths are taken
    from the current directory, as the training job took them)."""
    if not run.config_file.is_file():
        raise ConfigError(f"{run.config_file} not found; pass --store PATH of the prepared store")
    try:
        data = run.config().data
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --store PATH of the prepared store") from None
    return Path(data.prepared_dir) / data.source


def evaluation_preprocessing(model, card, image_size: int | None):
    """The card's preprocessing, at ``image_size`` (``--image-size``) when given: within the bounds a
    card may hold and what the architecture accepts (job/model.py: check_input_size), else exit 2."""
    if image_size is None or image_size == card.image_size:
        return card.preprocessing
    if not 16 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size={image_size} must be in [16, {MAX_IMAGE_SIZE}] (MAX_IMAGE_SIZE)")
    check_input_size(model.backbone, card.model, image_size, preprocessing(model.backbone).image_size, "--image-size")
    return dataclasses.replace(card.preprocessing, image_size=image_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a training run")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--store", help="prepared store to read (default: the one in the run's config.yaml)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per process per step")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="flip: also report the accuracy averaging each image's and its mirror's softmax")
    parser.add_argument("--image-size", type=positive_int,
                        help="pixels per side (default: the card's, the size the run evaluated at); FixRes: a model "
                             "often scores best above its training size (choose it on --split val)")
    args = parser.parse_args(argv)
    try:
        run = RunDir(args.run)
        trained = trained_config(run)
        # The run's own precision (and loader); the device is wherever this runs now.
        accelerator = build_accelerator(dataclasses.replace(trained.train, device="auto"), trained.timeouts)
        model, card = load_trained(run)
        store = load_store(args.store or store_of_run(run))
        if store.classes != card.classes:
            raise DataError(f"{store.path} has classes {store.classes}, the model was trained on {card.classes}")
        spec = LoaderSpec.for_run(evaluation_preprocessing(model, card, args.image_size),
                                  num_threads=trained.data.num_threads, device=accelerator.device,
                                  precision=accelerator.mixed_precision, loader=serving_loader(trained),
                                  say=accelerator.print)
        shard = Shard(batch_size=args.batch_size, rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = make_loader(store, args.split, spec, train=False, shard=shard)
    except (BadInput, DataError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model.to(accelerator.device)
    result = evaluate(model, loader, accelerator, card.num_classes)
    if args.tta != "none":  # beside the plain figures, never instead of them
        result["accuracy_tta"] = evaluate(model, loader, accelerator, card.num_classes, tta=args.tta)["accuracy"]
    if accelerator.is_main_process:
        print(json.dumps({"run": args.run, "split": args.split, "image_size": spec.prep.image_size,
                          "accuracy": result["accuracy"],
                          "loss": result["loss"], "samples": result["samples"],
                          "world_size": accelerator.num_processes,
                          **({"accuracy_tta": result["accuracy_tta"]} if args.tta != "none" else {}),
                          "per_class_accuracy": dict(zip(card.classes, result["per_class_accuracy"]))}))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
