"""Run under `accelerate launch --num_processes 2`: every eval sample must be seen exactly once.

Images encode their own index in their pixels (R = i % 256, G = i // 256), so what each rank
really received through DALI can be decoded and gathered.

Usage: eval_counts.py OUT.json N:BATCH [N:BATCH ...]   (one launch, several cases)
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dali_pipelines.loader import DaliLoader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec, Preprocessing
from job.loop import evaluate


class LabelFromPixels(torch.nn.Module):
    """A 'model' whose prediction is right for even indices only: accuracy is known exactly."""

    def forward(self, x):
        i = (x[:, 0, 0, 0] * 255).round().long() + 256 * (x[:, 1, 0, 0] * 255).round().long()
        pred = torch.where(i % 2 == 0, i % 10, (i + 1) % 10)
        return torch.nn.functional.one_hot(pred, 10).float()


def case(accelerator: Accelerator, n: int, batch: int) -> dict:
    idx = np.arange(n)
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[..., 0] = (idx % 256)[:, None, None]
    images[..., 1] = (idx // 256)[:, None, None]
    shard = Shard(batch_size=batch, rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DaliLoader(labels=idx % 10, images=images, train=False, shard=shard,
                        spec=LoaderSpec(Preprocessing(8, (0, 0, 0), (1, 1, 1)), num_threads=2))
    seen = []
    for x, _ in loader:
        pixels = (x[:, :2, 0, 0] * 255).round().long()
        seen += (pixels[:, 0] + 256 * pixels[:, 1]).tolist()
    result = evaluate(LabelFromPixels(), loader, accelerator, num_classes=10)
    flipped = evaluate(LabelFromPixels(), loader, accelerator, num_classes=10, tta="flip")
    return {"seen": gather_object(seen), "samples": result["samples"], "accuracy": result["accuracy"],
            "tta_samples": flipped["samples"], "tta_accuracy": flipped["accuracy"]}


out, accelerator = Path(sys.argv[1]), Accelerator(cpu=not torch.cuda.is_available())
results = {spec: case(accelerator, *map(int, spec.split(":"))) for spec in sys.argv[2:]}
if accelerator.is_main_process:
    out.write_text(json.dumps({"world_size": accelerator.num_processes, "cases": results}))
accelerator.end_training()
