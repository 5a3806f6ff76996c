"""Multi-process and GPU-path correctness that runs on CPU: DDP keeps every parameter in sync
(two_stage, after resume), torch.compile outputs usable weights, no silent CPU fallback,
bounded collective timeouts, per-node preparation order."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers.runs import PYTHON, accelerate_launch, run, small_run, train_until_sigterm
from helpers.wandb_log import summarize
from job import distributed
from job.config import ConfigError
from job.run_dir import RunDir


# ---------------------------------------------------------------- DDP keeps replicas identical

@pytest.mark.slow
def test_two_processes_preempted_resumed_and_stopped_early_stay_in_sync(tmp_path):
    """2 processes, two_stage: the backbone is frozen when DDP is built and unfrozen in epoch 2;
    SIGTERM mid epoch 2, resume, then early stopping (min_delta 1.0: no epoch after the first can
    improve, patience 1) on both ranks at once. The backbone must end bit-identical on both ranks
    (DDP registered it although it was frozen), the best (epoch 1) weights are the ones tested,
    and one W&B run spans both starts."""
    out = tmp_path / "ddp"
    args = small_run(out, tmp_path / "prep", "train.strategy=two_stage", "train.head_epochs=1", "train.epochs=5",
                     "early_stopping.patience=1", "early_stopping.min_delta=1.0", "tracking.wandb=offline")
    # 9 batches per rank and epoch: step 14 is mid epoch 2, after the unfreeze
    code, _ = train_until_sigterm(accelerate_launch(2, "job/train.py", *args), at_line="step 14:")
    assert code != 0 and not RunDir(out).summary_file.exists()
    assert any(not p.name.endswith("step0000009") for p in RunDir(out).checkpoints.iterdir())  # mid-epoch save
    resumed = run(accelerate_launch(2, "job/train.py", *args)).stdout
    assert "resumed from" in resumed and "epoch 2, sample" in resumed
    m = RunDir(out).summary()
    assert m.world_size == 2 and m.test_samples == 200
    assert m.stopped_early and m.epochs_completed == 2 and m.best_epoch == 0
    assert m.replicas_identical is True and "replicas identical" in resumed
    assert resumed.count("early stopping") == 1 and resumed.count("test accuracy") == 1  # once, not per rank
    again = json.loads(run([PYTHON, "job/evaluate.py", "--run", str(out)]).stdout.splitlines()[-1])
    assert again["accuracy"] == m.test_accuracy  # the test ran on the restored best weights
    runs = sorted(RunDir(out).wandb.glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name  # one W&B run across both starts
    facts = summarize(runs[-1])["config"]["run"]
    assert facts["world_size"] == 2 and facts["nodes"] == 1
    # Started again (say the job died after its last checkpoint): the early stop is remembered; no
    # further epoch trains, the same best weights are tested again.
    RunDir(out).summary_file.unlink()
    again = run(accelerate_launch(2, "job/train.py", *args)).stdout
    assert "resumed from" in again and "epoch 3, sample 0" in again and "\nepoch " not in again
    assert RunDir(out).summary().test_accuracy == m.test_accuracy and RunDir(out).summary().epochs_completed == 2
    assert len(RunDir(out).epochs()) == 2


@pytest.mark.slow
def test_replica_check_no_sync_under_compile_and_timeouts(tmp_path):
    out = tmp_path / "probe.json"
    run(accelerate_launch(2, "tests/helpers/distributed_probe.py", str(out)), check=False, timeout=300)
    result = json.loads(out.read_text())
    assert result["same"] is True and result["drifted"] is False
    # no_sync skips the all-reduce of every micro-batch that does not end in an update, compiled
    # or not; without it every micro-batch would all-reduce (which keeps replicas identical too,
    # so only a count can tell).
    counts = result["all_reduces"]
    assert counts["eager_accum1"] > 0
    assert counts["eager_accum2"] * 2 == counts["eager_accum1"], counts
    assert counts["compiled_accum2"] == counts["eager_accum2"], counts
    assert counts["compiled_accum2_without_no_sync"] == counts["eager_accum1"], counts
    # the setup timeout reaches the process group; training_timeouts shortens it
    assert result["setup_timeout_seconds"] == 60 and result["step_timeout_seconds"] == 3, result
    assert result["timed_out"], result
    # the 3 s step timeout, not the 1 min setup timeout: the bound sits between the two, so a busy
    # machine's delays (seconds) cannot fail it and the setup timeout (60 s) cannot pass it
    assert result["seconds"] < 40, result


# torch.compile on 2 processes with accumulation: tests/test_presets_e2e.py


# ---------------------------------------------------------------- no silent CPU fallback

def _fake_nvidia_smi(tmp_path: Path) -> dict:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}"}


def test_gpus_that_cuda_cannot_use_are_an_error_not_a_cpu_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path)["PATH"])
    with pytest.raises(ConfigError, match="shows GPUs .*GPU 0: NVIDIA H200.* but CUDA is not usable.*R580"):
        distributed.resolve_device("auto")
    with pytest.raises(ConfigError, match="train.device=cuda but CUDA is not usable"):
        distributed.resolve_device("cuda")
    assert distributed.resolve_device("cpu") == "cpu"  # on purpose


@pytest.mark.slow
def test_the_job_exits_2_on_a_gpu_node_with_a_broken_driver(tmp_path):
    proc = run([PYTHON, "job/train.py", *small_run(tmp_path / "o", tmp_path / "p")], env=_fake_nvidia_smi(tmp_path),
               check=False)
    assert proc.returncode == 2 and "R580" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()  # refused before any data was prepared


def test_no_visible_gpus_means_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    for var in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.resolve_device("auto") == "cpu"
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    assert distributed.resolve_device("auto") == "cpu"
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    with pytest.raises(ConfigError, match="NVIDIA_VISIBLE_DEVICES=all"):
        distributed.resolve_device("auto")


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    asked = []

    def emulated_only(including_emulation=True):  # e.g. a V100 or T4: bf16 only through emulation
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert distributed.resolve_precision("auto", "cuda") == "no"
    assert asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert distributed.resolve_precision("auto", "cuda") == "bf16"
    assert distributed.resolve_precision("auto", "cpu") == "no"
    assert distributed.resolve_precision("fp16", "cuda") == "fp16"


# ---------------------------------------------------------------- once per node

def test_work_runs_on_the_main_process_then_each_nodes_local_main_then_everywhere():
    """4 ranks on 2 nodes as threads sharing a barrier: the order of the work is the contract."""
    barrier, order, lock = threading.Barrier(4), [], threading.Lock()

    class FakeAccelerator:
        def __init__(self, rank):
            self.is_main_process, self.is_local_main_process = rank == 0, rank % 2 == 0
            self.rank = rank

        def wait_for_everyone(self):
            barrier.wait(timeout=300)  # a bound on a hang, not a speed: a loaded machine starts threads late

    def rank_main(rank):
        def work():
            time.sleep(0.05)
            with lock:
                order.append(rank)
            return rank
        assert distributed.once_per_node_first(FakeAccelerator(rank), work) == rank

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert order[0] == 0 and order[1] == 2 and sorted(order[2:]) == [1, 3]
