#!/usr/bin/env bash
# Container entrypoint: turn the environment of whichever orchestrator started this pod into one
# `accelerate launch` command, then exec it (so SIGTERM reaches the launcher, which forwards it to
# the training processes; they checkpoint and exit 143).
#
#   Kubeflow Trainer (torch-distributed runtime): PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
#                                                 PET_MASTER_PORT, PET_NPROC_PER_NODE
#   Indexed Job + headless Service:               JOB_COMPLETION_INDEX (node rank), NNODES,
#                                                 MASTER_ADDR (pod 0's DNS name), MASTER_PORT
#   plain torch.distributed variables:            MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK
#   nothing:                                      one node
# Processes per node: NPROC_PER_NODE (or PET_NPROC_PER_NODE) if a number, else the local GPU
# count, else 1 (CPU). Arguments are forwarded to job/train.py (or to TRAIN_SCRIPT).
# LAUNCH_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="${TRAIN_SCRIPT:-$here/job/train.py}"

count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

if [[ -n "${PET_NNODES:-}" ]]; then            # Kubeflow Trainer
  nnodes="$PET_NNODES"
  node_rank="${PET_NODE_RANK:-0}"
  master_addr="${PET_MASTER_ADDR:-}"
  master_port="${PET_MASTER_PORT:-29500}"
  nproc="${PET_NPROC_PER_NODE:-${NPROC_PER_NODE:-auto}}"
else                                            # Indexed Job, plain variables, or a single node
  nnodes="${NNODES:-1}"
  node_rank="${JOB_COMPLETION_INDEX:-${NODE_RANK:-0}}"  # an Indexed Job's index is the node rank
  master_addr="${MASTER_ADDR:-}"
  master_port="${MASTER_PORT:-29500}"
  nproc="${NPROC_PER_NODE:-auto}"
fi

if ! [[ "$nproc" =~ ^[0-9]+$ ]]; then           # auto / cpu / gpu / empty
  nproc="$(count_gpus)"
  [[ "$nproc" -ge 1 ]] || nproc=1
fi
for value in "$nnodes" "$node_rank" "$nproc" "$master_port"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "launch.sh: expected a number, got '$value'" >&2; exit 2; }
done
if (( nnodes > 1 )) && [[ -z "$master_addr" ]]; then
  echo "launch.sh: $nnodes nodes but no master address (set MASTER_ADDR or PET_MASTER_ADDR)" >&2
  exit 2
fi
if (( node_rank >= nnodes )); then
  echo "launch.sh: node rank $node_rank is not below the node count $nnodes" >&2
  exit 2
fi

total=$(( nnodes * nproc ))
cmd=(accelerate launch --num_machines "$nnodes" --num_processes "$total" --machine_rank "$node_rank")
(( total > 1 )) && cmd+=(--multi_gpu)          # torch.distributed: NCCL on GPUs, gloo on CPUs
(( nnodes > 1 )) && cmd+=(--main_process_ip "$master_addr" --main_process_port "$master_port")
# Precision and compilation come from the job's config (train.mixed_precision, train.compile).
cmd+=(--mixed_precision no --dynamo_backend no "$script" "$@")

if [[ "${LAUNCH_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
echo "launch.sh: node $node_rank/$nnodes, $nproc process(es) per node, master ${master_addr:-localhost}:$master_port" >&2
exec "${cmd[@]}"
