"""What the tests share: where things are, the one small run configuration, and runners for the
real entry points (train, evaluate, predict, the data CLI) on 1 or 2 processes."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"  # real CIFAR-10 samples shipped with the repository (README there)
CIFAR_TARBALL = SAMPLES / "cifar10-mini.tar.gz"
FOLDER_MINI = SAMPLES / "cifar10-folder-mini"
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _extracted(tarball: Path) -> Path:
    """The tarball's cifar-10-batches-py/, unpacked once per version into the temp directory.
    (Our own sample: tarfile's "data" filter is enough; job.data never extracts user tarballs.)"""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"cifar-transfer-samples-{digest}"
    if not (target / "cifar-10-batches-py" / "test_batch").is_file():
        tmp = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(target)
        except OSError:  # another pytest process got there first
            pass
    return target / "cifar-10-batches-py"


CIFAR_MINI = _extracted(CIFAR_TARBALL)  # 2,000 train / 1,000 test in the official layout


def folder_subset(tmp_path: Path, classes=("cat", "ship"), per_class: int = 10) -> Path:
    """A small image-folder dataset (``train/`` and ``test/``) copied from the real JPEG sample."""
    import shutil

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for src in sorted((FOLDER_MINI / split / cls).iterdir())[:per_class]:
                shutil.copy(src, root / split / cls / src.name)
    return root


def small_run(out: Path, prepared: Path, *overrides: str, data: str = "synthetic") -> list[str]:
    """Arguments of job/train.py for the one small test run (tests/configs/small.yaml), writing to
    ``out`` with its store under ``prepared``; ``data="cifar10"`` trains on the real sample."""
    args = ["--config", str(REPO / "tests" / "configs" / "small.yaml"), f"train.output_dir={out}",
            f"data.prepared_dir={prepared}"]
    if data == "cifar10":
        args += ["data.source=cifar10", f"data.root={CIFAR_MINI}"]
    return args + list(overrides)


def run(args: list[str], *, env: dict | None = None, timeout: int = 600, check: bool = True,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure show its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def accelerate_launch(num_processes: int, script: str, *args: str, port: int = 0) -> list[str]:
    """The real launcher: 2 processes on CPU use --multi_gpu (gloo); --cpu would run only one."""
    base = [ACCELERATE, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_processes", str(num_processes)]
    if num_processes > 1:
        base += ["--multi_gpu", "--main_process_port", str(port or free_port())]
    return base + [script, *args]


def train_until_sigterm(command: list[str], at_line: str, timeout: int = 300) -> tuple[int, str]:
    """Run ``command``, send it SIGTERM when a line starting with ``at_line`` appears (as the
    kubelet does on preemption); return its exit code and output."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(at_line):
            proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout), "".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_cli(root: Path, out: Path, source: str = "cifar10", *extra: str) -> subprocess.CompletedProcess:
    """``python -m job.data prepare``, not checked: the refusal tests read its exit code."""
    return run([PYTHON, "-m", "job.data", "prepare", "--source", source, "--root", str(root), "--out", str(out),
                *extra], check=False)


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, no traceback, and every needle (the path, the problem, the fix) in stderr."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
