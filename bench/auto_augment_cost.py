"""Images/s of a DALI training loader with and without data.auto_augment (CPU pipeline), on the
real CIFAR-10 sample store (data/samples): shuffled, shifted and flipped 32x32 images upscaled to
--size, batches of --batch-size. Steady state (the first batch, which includes the pipeline build,
is timed apart as "start"); policies measured alternately, --repeats times, median reported.

    python bench/auto_augment_cost.py [--size 96] [--batch-size 64] [--images 512] [--threads 2]
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import AutoAugment, LoaderSpec, Preprocessing
from job.config import DataConfig
from job.data import prepare

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples" / "cifar10-mini.tar.gz"


def measure(data, policy: str, args, epoch: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s after it) for one epoch's first ``args.images`` images."""
    spec = LoaderSpec(Preprocessing(args.size, (0.5,) * 3, (0.5,) * 3), num_threads=args.threads,
                      auto_augment=AutoAugment.of(policy))
    loader = DaliLoader(labels=data.labels, images=data.images, train=True, spec=spec,
                        shard=Shard(batch_size=args.batch_size))
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    seen = 0
    for images, _ in it:
        seen += images.shape[0]
        if seen >= args.images:
            break
    return t1 - t0, seen / (time.perf_counter() - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["none", "rand_augment", "trivial_augment", "auto_augment"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = prepare(DataConfig(source="cifar10", root=str(SAMPLES)), Path(tmp) / "cifar10")
        data = store.split("train")
        results: dict[str, list[tuple[float, float]]] = {p: [] for p in args.policies}
        for r in range(args.repeats):
            for policy in args.policies:
                results[policy].append(measure(data, policy, args, epoch=r))
    base = statistics.median(s for _, s in results[args.policies[0]])
    print(f"{len(data)} train images, batch {args.batch_size}, {args.size} px, {args.threads} DALI threads, CPU")
    for policy, runs in results.items():
        speed = statistics.median(s for _, s in runs)
        start = statistics.median(t for t, _ in runs)
        print(f"  {policy:16s} {speed:8.0f} images/s ({speed / base:5.2f}x)   first batch (build) {start:5.2f} s")


if __name__ == "__main__":
    main()
