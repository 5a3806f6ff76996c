"""Run under `accelerate launch --num_processes 2` (CPU, gloo): ddp.sync_batchnorm=true on a small
network with every kind of batch norm the models have (BatchNorm2d, timm's BatchNormAct2d, the
head's BatchNorm1d); each rank takes its half of one global batch, two training forwards and
backwards. Writes each rank's batch-norm buffers, outputs and gradients for
tests/test_sync_batchnorm.py, which compares them with one process over the whole batch.

Usage: sync_bn_probe.py OUT_PREFIX   (writes OUT_PREFIX.<rank>.json)
"""
import json
import sys

import torch
from timm.layers import BatchNormAct2d

from job.config import load_config
from job.distributed import build_accelerator, sync_batchnorm

GLOBAL_BATCH, PER_RANK = 12, 6


def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3), BatchNormAct2d(5), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen)
        x[:PER_RANK] += 1.5  # the ranks' halves differ: their own statistics would too
        batches.append((x, torch.randn(GLOBAL_BATCH, 6, generator=gen)))
    return batches


def run(model: torch.nn.Module, batches) -> dict:
    model.train()
    outputs = []
    for x, w in batches:
        y = model(x)
        (y * w).sum().backward()
        outputs.append(y.detach().tolist())
    buffers = {k: v.tolist() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    grads = {k: p.grad.tolist() for k, p in model.named_parameters()}
    return {"buffers": buffers, "outputs": outputs, "grads": grads}


if __name__ == "__main__":
    cfg = load_config(None, ["ddp.sync_batchnorm=true"])
    acc = build_accelerator(cfg.train, cfg.timeouts)
    rank = acc.process_index
    model = network()
    converted = sync_batchnorm(acc, model, cfg.ddp.sync_batchnorm, PER_RANK)
    mine = [(x[rank * PER_RANK:(rank + 1) * PER_RANK], w[rank * PER_RANK:(rank + 1) * PER_RANK])
            for x, w in global_batches()]
    result = {"converted": converted, "world_size": acc.num_processes, **run(model, mine)}
    with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
        json.dump(result, f)
    acc.end_training()  # destroys the process group: exiting with it alive can abort in gloo's teardown
