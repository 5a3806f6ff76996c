"""job/train.py whose training fails with an unexpected error (what a GPU Xid error or a storage
failure looks like from outside): the real main(), exit code reporting included.

Usage: as TRAIN_SCRIPT of docker/launch.sh, with job/train.py's arguments.
"""
import sys

import job.train


def fit(cfg):  # noqa: ARG001 - same signature as job.train.fit
    raise RuntimeError("simulated crash: CUDA error: an illegal memory access was encountered")


job.train.fit = fit
sys.exit(job.train.main())
