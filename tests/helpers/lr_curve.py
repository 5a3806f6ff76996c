"""Run the real training loop on a tiny model and fake batches; write the LR after every update.

Usage: lr_curve.py OUT.json SCHEDULE:EPOCHS:BATCHES_PER_EPOCH:GRAD_ACCUM ...  (1 or N processes)
"""
import json
import sys
from pathlib import Path


import torch
from accelerate import Accelerator

from batch_list import BatchList  # beside this script
from job.config import load_config
from job.loop import StepHooks, TrainParts, TrainState, train_one_epoch
from job.model import build_head, TransferModel
from job.optim import build_optimizer, build_scheduler

out = sys.argv[1]
accelerator = Accelerator(cpu=not torch.cuda.is_available())


class Backbone(torch.nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward_features(self, x):
        return self.conv(x)


def curve(schedule: str, epochs: int, batches: int, accum: int) -> dict:
    cfg = load_config(None, [f"schedule.name={schedule}", "schedule.warmup_epochs=1", "optim.lr=0.1",
                             "schedule.warmup_lr=0.001", "schedule.min_lr=0.0001", "schedule.decay_epochs=1",
                             "schedule.decay_rate=0.5", "optim.backbone_lr_scale=0.1"])
    torch.manual_seed(0)
    model = TransferModel(Backbone(), build_head(4, 3, [], 0.0))
    optimizer = build_optimizer(model, cfg.optim, train_backbone=True)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs=epochs, updates_per_epoch=-(-batches // accum),
                                plateau_mode="max")
    model, optimizer = accelerator.prepare(model, optimizer)
    lrs, state = [], TrainState()
    parts = TrainParts(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                       loss_fn=torch.nn.CrossEntropyLoss(),
                       ddp=model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None)
    train_cfg = load_config(None, ["train.grad_clip=1.0", f"train.grad_accum_steps={accum}", "train.log_every=1",
                                   "train.signal_check_every=1000"]).train
    hooks = StepHooks(on_log=lambda log: lrs.append([log.step, log.lr, optimizer.param_groups[-1]["lr"]]))
    for epoch in range(epochs):
        loader = BatchList([(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(batches)],
                           rank=accelerator.process_index, world_size=accelerator.num_processes)
        train_one_epoch(train_cfg, parts, loader, state, hooks)
        state.samples_in_epoch = 0
        scheduler.step(epoch + 1, 0.5)  # constant metric: plateau decays after its patience
    return {"lrs": lrs, "steps": state.global_step}


results = {}
for spec in sys.argv[2:]:
    name, epochs, batches, accum = spec.split(":")
    results[name] = curve(name, int(epochs), int(batches), int(accum))
Path(f"{out}.rank{accelerator.process_index}").write_text(json.dumps(results))
accelerator.end_training()
