"""bench/gpu_smoke.sh, the GPU machine's one prepared call, runs end to end here as its dry run."""
import pytest

from helpers.runs import REPO, run


@pytest.mark.slow
def test_the_gpu_smoke_script_dry_run_passes_and_says_what_it_skipped(tmp_path):
    proc = run([str(REPO / "bench" / "gpu_smoke.sh"), "--dry-run"], env={"OUT": str(tmp_path)}, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "failed: none", proc.stdout[-3000:]
    assert lines[-1].startswith("skipped: ") and "no GPU" in lines[-1]
    assert "evaluate.py: accuracy" in proc.stdout and "SIGTERM and resume (dry run" in lines[-1]
    for step in ("environment", "DALI GPU pipelines vs CPU pipelines", "training paths", "throughput"):
        assert f"== {step}" in proc.stdout
    assert (tmp_path / "gpu_smoke.log").read_text() == proc.stdout  # the log file holds the same


def test_gpus_that_cuda_cannot_use_fail_the_smoke_test_loudly(tmp_path):
    """A node that lists GPUs (here: the container runtime's variable) while CUDA cannot use them
    is what the smoke test exists to catch: it fails and names the driver, not a quiet dry run."""
    proc = run([str(REPO / "bench" / "gpu_smoke.sh")], env={"OUT": str(tmp_path), "NVIDIA_VISIBLE_DEVICES": "all"},
               check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "MISSING: CUDA cannot use the GPU(s)" in proc.stdout and "R580" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "failed: environment (no usable GPU)"
