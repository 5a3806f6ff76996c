"""Fixtures shared by the tests: small prepared stores of the real CIFAR-10 samples. Everything
else the tests share (paths, the small run, runners) is in tests/helpers/runs.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from job.config import DataConfig
from helpers.runs import CIFAR_MINI, FOLDER_MINI

# Tools installed into the venv (kubectl, hadolint, accelerate) come first for every subprocess.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def cifar_store(tmp_path_factory):
    from job.data import prepare

    store, _ = prepare(DataConfig(source="cifar10", root=str(CIFAR_MINI)),
                       tmp_path_factory.mktemp("stores") / "cifar10")
    return store


@pytest.fixture(scope="session")
def folder_store(tmp_path_factory):
    from job.data import prepare

    store, _ = prepare(DataConfig(source="folder", root=str(FOLDER_MINI)), tmp_path_factory.mktemp("stores") / "folder")
    return store
