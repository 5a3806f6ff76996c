"""Run under `accelerate launch --num_processes 2`: the multi-process safety nets.

1. ``replicas_identical`` says True for replicas DDP keeps in sync, False once rank 1 drifts.
2. DDP's ``no_sync`` still skips the gradient all-reduce on accumulation micro-batches when the
   model is compiled the way the trainer compiles it (``wrap_for_training``): all-reduces are
   counted with a DDP communication hook, against an uncompiled run and a run without no_sync.
3. The process group starts with the setup timeout (here 1 min) and, after
   ``training_timeouts``, a collective whose peer never arrives fails within the short step
   timeout (here 3 s).

Usage: distributed_probe.py OUT.json
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from job.config import load_config
from batch_list import BatchList  # beside this script
from job.distributed import (build_accelerator, collective_timeout, replicas_identical, training_timeouts,
                             wrap_for_training)
from job.loop import TrainParts, TrainState, train_one_epoch


out = Path(sys.argv[1])
config = load_config(None, ["timeouts.setup_minutes=1", "timeouts.step_minutes=0.05",
                            "train.log_every=1000", "train.signal_check_every=1000"])
cfg = config.train
accelerator = build_accelerator(cfg, config.timeouts)
result = {"setup_timeout_seconds": collective_timeout().total_seconds()}

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
result["same"] = replicas_identical(accelerator, model)
if accelerator.process_index == 1:
    with torch.no_grad():
        model[1].bias[0] += 1e-7  # one ulp-sized drift
result["drifted"] = replicas_identical(accelerator, model)


class NoSchedule:
    def step_update(self, num_updates):
        pass


def all_reduces(accum: int, compile: bool, use_no_sync: bool = True) -> int:
    """Gradient all-reduces (DDP buckets sent) over 4 micro-batches of one epoch."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    call, ddp, optimizer = wrap_for_training(accelerator, net, optimizer, compile=compile)
    calls = [0]

    def counting(state, bucket):
        calls[0] += 1
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, counting)
    batches = BatchList([(torch.randn(6, 8), torch.randint(0, 3, (6,))) for _ in range(4)],
                        rank=accelerator.process_index, world_size=accelerator.num_processes)
    parts = TrainParts(model=call, optimizer=optimizer, scheduler=NoSchedule(), accelerator=accelerator,
                       loss_fn=torch.nn.CrossEntropyLoss(), ddp=ddp if use_no_sync else None)
    state = TrainState()
    train_one_epoch(dataclasses.replace(cfg, grad_accum_steps=accum), parts, batches, state)
    assert state.global_step == 4 // accum
    return calls[0]


result["all_reduces"] = {"eager_accum1": all_reduces(1, compile=False),
                         "eager_accum2": all_reduces(2, compile=False),
                         "compiled_accum2": all_reduces(2, compile=True),
                         "compiled_accum2_without_no_sync": all_reduces(2, compile=True, use_no_sync=False)}

training_timeouts(accelerator, config.timeouts)
result["step_timeout_seconds"] = collective_timeout().total_seconds()
if accelerator.process_index == 1:
    time.sleep(12)  # a lost peer: never joins the collective below in time
else:
    start = time.perf_counter()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        result["timed_out"] = False
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError / DistBackendError
        result["timed_out"] = True
        result["error"] = f"{type(e).__name__}: {e}"[:300]
    result["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(result))
