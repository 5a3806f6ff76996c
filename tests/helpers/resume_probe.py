"""Run under `accelerate launch --num_processes 2`: which checkpoint does each rank resume from
when rank 1 sees an older listing of the checkpoint directory (a restarted node on network
storage whose directory cache is stale)? Each rank has its own view of ``output_dir``: rank 0's
holds two checkpoints, rank 1's only the older one. Writes {rank: chosen name} per rank.

Usage: resume_probe.py OUT_DIR
"""
import json
import sys
from pathlib import Path

from job.checkpoint import Checkpointer
from job.config import CHECKPOINT_MARKER, load_config
from job.distributed import build_accelerator
from job.run_dir import RunDir

out = Path(sys.argv[1])
config = load_config(None, ["timeouts.setup_minutes=1"])
accelerator = build_accelerator(config.train, config.timeouts)
rank = accelerator.process_index
view = out / f"view{rank}"
names = ["epoch0001-step0000017", "epoch0002-step0000034"] if rank == 0 else ["epoch0001-step0000017"]
for name in names:
    (RunDir(view).checkpoints / name).mkdir(parents=True, exist_ok=True)
    (RunDir(view).checkpoints / name / CHECKPOINT_MARKER).write_text("{}")
chosen = Checkpointer(accelerator, view, keep=2).resolve("auto")
(out / f"rank{rank}.json").write_text(json.dumps({"chosen": chosen.name if chosen else None,
                                                  "listed": [p.name for p in Checkpointer(accelerator, view, 2)
                                                             .all()]}))
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: exiting with it alive can abort in gloo's teardown
