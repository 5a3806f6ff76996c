"""A stand-in training process for the launcher tests (docker/launch.sh, TRAIN_SCRIPT): reports
and exits like job/train.py's main(), in a fraction of a second, with no torch import.

Usage: exit_with.py ACTION[,ACTION...]   (one ACTION per rank, RANK from the launcher)
  N        report N and exit with it
  sigterm  print "waiting", wait for SIGTERM, then report 143 (a checkpointing job: 1 s)
  slowsave the same, with a checkpoint that takes 8 s
  finish   print "waiting", wait for SIGTERM, then report 0 (it came after the last signal check)
  kill     die of SIGKILL without reporting (what the out-of-memory killer does)
"""
import os
import signal
import sys
import time

from job.preemption import EXIT_PREEMPTED, record_exit_code

action = sys.argv[1].split(",")[int(os.environ.get("RANK", "0"))]
if action == "kill":
    time.sleep(0.5)  # let the other ranks start
    os.kill(os.getpid(), signal.SIGKILL)
if action in ("sigterm", "slowsave", "finish"):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("waiting", flush=True)
    deadline = time.time() + 600  # the tests wait for every rank's "waiting" (slow to start when the machine is busy)
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(8 if action == "slowsave" else 1)  # saving takes a while: the launcher must wait for it
    code = 0 if action == "finish" else EXIT_PREEMPTED if stop else 1
else:
    code = int(action)
record_exit_code(code)
sys.exit(code)
