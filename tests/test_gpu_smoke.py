"""bench/gpu_smoke.sh, the GPU machine's one prepared call, runs end to end here as its dry run:
with the project installed and DALI, and as on a bare GPU machine (a plain checkout, a Python
that has torch/timm/accelerate but neither this project nor DALI)."""
import sys
from pathlib import Path

import pytest

from helpers.runs import REPO, run

# What a bare GPU machine looks like from Python: the venv's packages without the project's
# editable install (a .pth line adds a directory but runs none of that directory's .pth files)
# and with nvidia.dali unimportable.
_HIDE_DALI = '''import importlib.abc, sys
class _NoDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoDali())
'''


def bare_python(root: Path) -> Path:
    """A venv whose site-packages points at ours, minus the project and DALI."""
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    site = next(root.glob("lib/python3*/site-packages"))
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "packages.pth").write_text(f"{ours}\nimport _no_dali\n")
    (site / "_no_dali.py").write_text(_HIDE_DALI)
    return root / "bin" / "python"


@pytest.mark.slow
def test_the_gpu_smoke_script_dry_run_passes_and_says_what_it_skipped(tmp_path):
    proc = run([str(REPO / "bench" / "gpu_smoke.sh"), "--dry-run"], env={"OUT": str(tmp_path)}, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "failed: none", proc.stdout[-3000:]
    assert lines[-1].startswith("skipped: ") and "no GPU" in lines[-1]
    assert "evaluate.py: accuracy" in proc.stdout and "SIGTERM and resume (dry run" in lines[-1]
    for step in ("environment", "DALI GPU pipelines vs CPU pipelines", "training paths", "model throughput",
                 "figures"):
        assert f"== {step}" in proc.stdout
    assert "fastest per-GPU batch" in proc.stdout and "GFLOP/image, MFU" in proc.stdout
    assert "MFU denominators" in proc.stdout and "measured 512^3 matmul" in proc.stdout
    # the dry run's Python start-ups: the script, train.py, evaluate.py, predict.py, model_throughput.py
    (startups,) = [line for line in lines if line.startswith("Python start-ups, minutes in all")]
    assert startups.split()[-2] == "5,", startups
    assert (tmp_path / "gpu_smoke.log").read_text() == proc.stdout  # the log file holds the same


@pytest.mark.slow
def test_the_dry_run_passes_from_a_plain_checkout_without_the_project_installed_or_dali(tmp_path):
    python = bare_python(tmp_path / "bare")
    bare = {"PYTHONPATH": ""}  # nothing inherited from the test runner's environment either
    probe = run([str(python), "-c", "import job"], cwd=tmp_path, check=False, env=bare)
    assert probe.returncode != 0 and "No module named 'job'" in probe.stderr  # truly not installed
    probe = run([str(python), "-c", "import nvidia.dali"], cwd=tmp_path, check=False, env=bare)
    assert probe.returncode != 0
    proc = run([str(REPO / "bench" / "gpu_smoke.sh"), "--dry-run"],
               env={**bare, "OUT": str(tmp_path), "PYTHON": str(python)}, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == "failed: none", proc.stdout[-3000:]
    assert "MISSING: nvidia.dali" in proc.stdout and "DALI GPU/CPU parity" in lines[-1]
    assert "data.loader=torch" not in lines[-1] and "evaluate.py: accuracy" in proc.stdout
    assert "fastest per-GPU batch" in proc.stdout


def test_gpus_that_cuda_cannot_use_fail_the_smoke_test_loudly(tmp_path):
    """A node that lists GPUs (here: the container runtime's variable) while CUDA cannot use them
    is what the smoke test exists to catch: it fails and names the driver, not a quiet dry run."""
    proc = run([str(REPO / "bench" / "gpu_smoke.sh")], env={"OUT": str(tmp_path), "NVIDIA_VISIBLE_DEVICES": "all"},
               check=False, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "MISSING: CUDA cannot use the GPU(s)" in proc.stdout and "R580" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "failed: environment (no usable GPU)"
