"""Run under `accelerate launch --num_processes 2`: the two safety nets of multi-process runs.

1. ``replicas_identical`` says True for replicas DDP keeps in sync, False once rank 1 drifts.
2. After ``training_timeouts``, a collective whose peer never arrives fails within the short
   step timeout (here 3 s) instead of the generous setup timeout (here 1 min).

Usage: distributed_probe.py OUT.json
"""
import json
import sys
import time
from pathlib import Path


import torch

from job.config import load_config
from job.distributed import build_accelerator, training_timeouts
from job.train import replicas_identical

out = Path(sys.argv[1])
cfg = load_config(None, ["train.setup_timeout_minutes=1", "train.step_timeout_minutes=0.05"]).train
accelerator = build_accelerator(cfg)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
same = replicas_identical(accelerator, model)
if accelerator.process_index == 1:
    with torch.no_grad():
        model[1].bias[0] += 1e-7  # one ulp-sized drift
drifted = replicas_identical(accelerator, model)

training_timeouts(accelerator, cfg)
result = {"same": same, "drifted": drifted}
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
