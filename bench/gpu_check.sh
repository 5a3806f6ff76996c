#!/usr/bin/env bash
# One prepared call for a lent GPU machine (see docs/BENCHMARKS.md): the model side of the
# "pipeline >= 10x model" check. DALI is not installed there; carry its wheels to add the
# pipeline side: python bench/data_throughput.py --device gpu --size 299.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L || true
for precision in bf16 no; do
  python3 bench/model_throughput.py --model inception_resnet_v2 --size 299 --batch-size 64 \
    --precision "$precision" --channels-last --steps 30
done
if python3 -c "import nvidia.dali" 2>/dev/null; then
  python3 bench/data_throughput.py --device gpu --size 299 --batch-size 64 --workers 4
fi
