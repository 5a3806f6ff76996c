#!/usr/bin/env bash
# The GPU smoke test as one command (bench/gpu_smoke.py says what it checks). Its output is also
# written to $OUT/gpu_smoke.log (the device tool's return folder) or ./gpu_smoke.log.
#   bench/gpu_smoke.sh            # on a GPU machine, < 6 minutes, no internet needed
#   bench/gpu_smoke.sh --dry-run  # CPU only, tiny sizes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
# A plain checkout needs no install: the job's modules import from the repository root.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
set -o pipefail
PYTHONUNBUFFERED=1 "$python" bench/gpu_smoke.py "$@" 2>&1 | tee "${OUT:-.}/gpu_smoke.log"
