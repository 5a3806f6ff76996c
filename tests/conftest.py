"""Shared fixtures: paths to the real CIFAR-10 samples, small stores, and a runner for the real entry points."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CIFAR_MINI = SHARED / "cifar10-mini" / "cifar-10-batches-py"
FOLDER_MINI = SHARED / "cifar10-folder-mini"
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def pytest_collection_modifyitems(items):
    missing = [p for p in (CIFAR_MINI, FOLDER_MINI) if not p.exists()]
    if missing:  # say why instead of failing obscurely
        raise pytest.UsageError(f"real CIFAR-10 samples not found at {missing}; tests expect ../shared/data")


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
