"""Shared fixtures: paths to the real CIFAR-10 samples, small stores, and a runner for the real entry points."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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


CIFAR_MINI = _extracted(CIFAR_TARBALL)
# Tools installed into the venv (kubectl, hadolint, accelerate) come first for every subprocess.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def cifar_store(tmp_path_factory):
    from job.data import prepare

    store, _ = prepare("cifar10", CIFAR_MINI, tmp_path_factory.mktemp("stores") / "cifar10")
    return store


@pytest.fixture(scope="session")
def folder_store(tmp_path_factory):
    from job.data import prepare

    store, _ = prepare("folder", FOLDER_MINI, tmp_path_factory.mktemp("stores") / "folder")
    return store


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
        base += ["--multi_gpu", "--main_process_port", str(port or _free_port())]
    return base + [script, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
