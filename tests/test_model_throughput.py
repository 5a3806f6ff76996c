"""bench/model_throughput.py's MFU: the datasheet table, the arithmetic, both denominators printed."""
from __future__ import annotations

import sys

import pytest
from helpers.runs import REPO, run

sys.path.insert(0, str(REPO / "bench"))
import model_throughput as mt  # noqa: E402


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),   # SXM
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA A10G", "bf16", 70.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L40", "bf16", 181.0),
    ("NVIDIA H100 80GB HBM3", "no", None),      # fp32: no tensor-core entry, --peak-tflops
    ("Tesla V100-SXM2-16GB", "bf16", None),
    ("cpu", "bf16", None),
])
def test_datasheet_peaks(name, precision, tflops):
    assert mt.datasheet_tflops(name, precision) == tflops


def test_mfu_arithmetic():
    # 39.5 GFLOP per image at 10,000 images/s against an H100 SXM's 989 TFLOP/s: 39.9%
    assert mt.mfu(10_000, 39.5e9, 989.0) == pytest.approx(0.3994, abs=1e-4)
    assert mt.mfu(10_000, 39.5e9, None) is None
    assert mt.mfu(1.0, 1e12, 1.0) == 1.0


def test_measured_matmul_rate_is_timed_after_a_warm_up():
    import torch

    rate = mt.matmul_tflops(torch.device("cpu"), None, n=128, warmup_seconds=0.05, seconds=0.05)
    assert 0 < rate < 100  # TFLOP/s of a CPU


@pytest.mark.slow
def test_both_denominators_are_printed(tmp_path):
    out = run([sys.executable, "bench/model_throughput.py", "--model", "test_resnet", "--size", "32",
               "--batch-size", "8", "--precision", "bf16", "--steps", "2", "--warmup", "1",
               "--peak-tflops", "0.5", "--matmul-size", "128"]).stdout
    lines = out.strip().splitlines()
    assert "peak 0.5 TFLOP/s (--peak-tflops); measured 128^3 matmul" in lines[0]
    (batch,) = [line for line in lines if line.startswith("batch 8:")]
    ips = float(batch.split("images/s = ")[1].split(",")[0])
    gflop = float(batch.split(", ")[1].split(" GFLOP")[0])
    shown = float(batch.split("MFU ")[1].split("%")[0]) / 100
    assert shown == pytest.approx(ips * gflop * 1e9 / 0.5e12, rel=0.02, abs=0.001)  # of the given peak
    assert "of measured matmul" in batch
    assert lines[-1].startswith("MFU denominators: peak 0.5 TFLOP/s (--peak-tflops); measured 128^3 matmul")
