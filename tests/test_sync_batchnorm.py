"""ddp.sync_batchnorm (job/distributed.py): when it is on, and that two processes then hold the
batch-norm statistics one process computes over the same global batch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import accelerate_launch, run, small_run
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct

from job.distributed import use_sync_batchnorm
from job.run_dir import RunDir

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import sync_bn_probe  # noqa: E402


@pytest.mark.parametrize("choice,batch,processes,device,on", [
    ("auto", 16, 16, "cuda", True),    # finetune.yaml's 16 images on each of 16 GPUs
    ("auto", 31, 2, "cuda", True),
    ("auto", 32, 8, "cuda", False),    # 32 images per BN batch: each GPU's own statistics
    ("auto", 16, 1, "cuda", False),    # one process: nothing to synchronise
    ("auto", 16, 2, "cpu", False),     # CPU processes (tests, rehearsals): only when asked
    ("true", 256, 2, "cpu", True),
    ("true", 16, 1, "cuda", False),
    ("false", 8, 16, "cuda", False),
])
def test_when_batch_norm_is_synchronised(choice, batch, processes, device, on):
    assert use_sync_batchnorm(choice, batch, processes, device) is on


def test_gpu_conversion_keeps_parameters_buffers_and_keys():
    """On GPUs timm's convert_sync_batchnorm: SyncBatchNorm, SyncBatchNormAct for the fused
    BN + activation (torch's own converter would drop the activation), same tensors."""
    from timm.layers import convert_sync_batchnorm

    model = sync_bn_probe.network()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    assert convert_sync_batchnorm(model) is model  # in place: what sync_batchnorm relies on
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.SyncBatchNorm, SyncBatchNormAct, torch.nn.SyncBatchNorm]
    assert not any(isinstance(m, BatchNormAct2d) and not isinstance(m, SyncBatchNormAct) for m in model.modules())
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


@pytest.mark.slow
def test_two_processes_hold_the_statistics_of_one_process_over_the_global_batch(tmp_path):
    prefix = tmp_path / "probe"
    run(accelerate_launch(2, "tests/helpers/sync_bn_probe.py", str(prefix)), timeout=300)
    ranks = [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["converted"] for r in ranks] == [3, 3]
    one = sync_bn_probe.run(sync_bn_probe.network(), sync_bn_probe.global_batches())
    assert set(ranks[0]["buffers"]) == set(one["buffers"]) and len(one["buffers"]) == 9
    for key, expected in one["buffers"].items():
        # identical on both ranks (one all-reduced sum), equal to one process over all 12 images
        assert ranks[0]["buffers"][key] == ranks[1]["buffers"][key], key
        np.testing.assert_allclose(ranks[0]["buffers"][key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    assert ranks[0]["buffers"]["1.num_batches_tracked"] == 2
    half = sync_bn_probe.PER_RANK
    for step in range(2):
        for r in range(2):  # each rank's outputs: its rows of the one-process outputs
            np.testing.assert_allclose(ranks[r]["outputs"][step], one["outputs"][step][r * half:(r + 1) * half],
                                       rtol=1e-4, atol=1e-5)
    for key, expected in one["grads"].items():  # DDP sums (then averages) these: the global gradient
        total = np.add(ranks[0]["grads"][key], ranks[1]["grads"][key])
        scale = max(1.0, np.abs(expected).max())  # a conv bias before a BN: zero gradient, rounding noise
        np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=key)
    # and without synchronisation the two halves' statistics differ (the test can fail)
    unsynced = sync_bn_probe.run(sync_bn_probe.network(), [(x[:half], w[:half])
                                                           for x, w in sync_bn_probe.global_batches()])
    assert not np.allclose(unsynced["buffers"]["1.running_mean"], one["buffers"]["1.running_mean"], atol=1e-3)


@pytest.mark.slow
def test_a_two_process_training_run_with_sync_batchnorm(tmp_path):
    """Through the real entry point: converted before DDP, with the weight EMA and a checkpoint."""
    out = tmp_path / "run"
    args = small_run(out, tmp_path / "prep", "train.epochs=1", "ddp.sync_batchnorm=true", "data.batch_size=16",
                     "ema.epochs=0.5")
    proc = run(accelerate_launch(2, "job/train.py", *args), timeout=400)
    assert "ddp.sync_batchnorm=true:" in proc.stdout and "over all 2 processes (16 images each)" in proc.stdout
    summary = RunDir(out).summary()
    assert summary.world_size == 2 and summary.epochs_completed == 1 and summary.replicas_identical is True
