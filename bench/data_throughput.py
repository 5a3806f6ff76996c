"""Images/s of the DALI training pipeline vs two baselines doing the same work: a torchvision
DataLoader, and this job's own PyTorch loader (data.loader=torch, dali_pipelines/torch_loader.py).

Both produce the same thing from the same uint8 32x32 CIFAR arrays: random crop with 4-pixel
zero padding, horizontal flip, bilinear resize to --size, normalization, NCHW float32 batches,
with the same number of CPU threads (DALI) / worker processes (DataLoader). Measured in the
same run, alternating, so a noisy machine affects both alike.

    python bench/data_throughput.py [--size 299] [--batch-size 64] [--workers 2] [--batches 40]
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from job.config import DataConfig
from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec, Preprocessing
from dali_pipelines.torch_loader import TorchLoader
from job.data import prepare

MEAN = STD = (0.5, 0.5, 0.5)  # Inception-ResNet-V2


class CifarArrays(Dataset):
    def __init__(self, images, labels, size: int):
        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
            v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.from_numpy(self.images[i].copy()).permute(2, 0, 1)  # CHW uint8
        return self.transform(image), int(self.labels[i])


def images_per_second(batches, limit: int, warmup: int = 3) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    for _ in range(limit):
        images, _ = next(it)
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def _synchronized(loader):
    class Synced:
        def __iter__(self):
            for images, labels in loader:
                torch.cuda.synchronize()
                yield images, labels

        def set_epoch(self, *a):
            loader.set_epoch(*a)

    return Synced()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="DALI operators on CPU or GPU 0")
    args = p.parse_args()
    torch.set_num_threads(1)  # the workers/threads do the work; keep the main process out of it
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = prepare(DataConfig(source="synthetic", root=str(Path(tmp) / "src"), synthetic_train=5000,
                                      synthetic_test=100), Path(tmp) / "store")
        train = store.split("train")
        spec = LoaderSpec(Preprocessing(args.size, MEAN, STD), num_threads=args.workers,
                          device_id=0 if args.device == "gpu" else None)
        shard = Shard(batch_size=args.batch_size)
        dali = DaliLoader(labels=train.labels, images=train.images, train=True, spec=spec, shard=shard)
        ours_torch = TorchLoader(labels=train.labels, images=train.images, train=True, shard=shard,
                                 spec=dataclasses.replace(spec, backend="torch"))
        torch_loader = DataLoader(CifarArrays(train.images, train.labels, args.size), batch_size=args.batch_size,
                                  shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=True,
                                  prefetch_factor=2)
        x, _ = next(iter(dali))
        y, _ = next(iter(torch_loader))
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape)
        if args.device == "gpu":  # count only batches that are ready on the GPU
            dali, ours_torch = _synchronized(dali), _synchronized(ours_torch)
        results = {"dali": [], "torch loader": [], "torchvision": []}
        for repeat in range(args.repeats):
            dali.set_epoch(repeat)
            results["dali"].append(images_per_second(dali, args.batches))
            ours_torch.set_epoch(repeat)
            torch.set_num_threads(args.workers)  # its work runs in this process: the same threads as DALI's
            results["torch loader"].append(images_per_second(ours_torch, args.batches))
            torch.set_num_threads(1)
            results["torchvision"].append(images_per_second(torch_loader, args.batches))
    print(f"{'pipeline':<14}{'images/s (median)':>20}   runs")
    for name, values in results.items():
        print(f"{name:<14}{statistics.median(values):>20.1f}   {'  '.join(f'{v:.1f}' for v in values)}")
    print(f"output: {args.batch_size}x3x{args.size}x{args.size} float32, {args.workers} threads/workers")
    for baseline in ("torchvision", "torch loader"):
        ratio = statistics.median(results["dali"]) / statistics.median(results[baseline])
        print(f"ratio dali/{baseline} = {ratio:.2f}")


if __name__ == "__main__":
    main()
