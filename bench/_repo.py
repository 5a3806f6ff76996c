"""Imported first by every bench script: puts the repository root on ``sys.path`` (and on
``PYTHONPATH`` for the job processes a script starts), so the scripts run from a plain checkout
with a system Python that has torch/timm/accelerate but not this project installed: a bare GPU
machine's case (bench/gpu_smoke.sh)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
if str(ROOT) not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, _paths)])
