#!/usr/bin/env bash
# Container entrypoint: turn the environment of whichever orchestrator started this pod into one
# `accelerate launch` command, run it, and exit with the job's own exit code (job/preemption.py):
#   0 done | 2 bad config, data or weights | 143 preempted, a checkpoint was saved | else a crash
#
#   Kubeflow Trainer (torch-distributed runtime): PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR,
#                                                 PET_MASTER_PORT, PET_NPROC_PER_NODE
#   Indexed Job / JobSet + headless Service:      JOB_COMPLETION_INDEX (node rank), NNODES,
#                                                 MASTER_ADDR (pod 0's DNS name), MASTER_PORT
#   plain torch.distributed variables:            MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK
#   nothing:                                      one node
# Processes per node: NPROC_PER_NODE (or PET_NPROC_PER_NODE) if a number, else the local GPU
# count, else 1 (CPU). Arguments are forwarded to job/train.py (or to TRAIN_SCRIPT).
# TERMINATION_GRACE_PERIOD_SECONDS: the pod's terminationGracePeriodSeconds (the manifests set
# both), from which torchrun's shutdown timeout is derived. RENDEZVOUS_TIMEOUT_SECONDS (default
# 3600): how long torchrun waits for every node to join (its own default, 600 s, is shorter than
# a gang of GPU nodes may take to be scheduled, pull the image and start). LAUNCH_DRY_RUN=1
# prints the command.
#
# Signals. This script is PID 1 of the container, and the kubelet sends its SIGTERM (preemption,
# node drain, `kubectl delete`) to PID 1 only; the kernel drops signals that PID 1 has no handler
# for. So it does not `exec` the launcher (the one-process `accelerate launch` installs no SIGTERM
# handler: as PID 1 the signal would vanish, no checkpoint would be written and the pod would be
# SIGKILLed after the grace period; torchrun has one, but then exits 1). It runs the launcher in its own process group, forwards SIGTERM/SIGINT to that
# group and waits until every process in it has exited. One process per node: the training
# process is in that group and gets the signal directly (the launcher itself dies at once).
# Several: torchrun gets it and forwards it to its workers (they run in sessions of their own).
#
# Exit codes. torchrun reports any failed worker as 1 and the one-process `accelerate launch`
# loses the code too, so every training process writes its own to $JOB_EXIT_CODE_DIR/RANK.code
# (job/preemption.py) and this script maps them back: the launcher exited 0 -> 0; any process
# reported 2 -> 2; every local process reported 143 -> 143; else the first other code a process
# reported, else the launcher's (1 instead of 143: that one proves no checkpoint). A process killed
# outright (out of memory, SIGKILL) reports nothing, so a preemption that did not save everywhere
# reads as a crash. Except a SIGTERM that this script forwarded before the launcher had started any
# training process (it spends seconds importing torch): nothing ran, the pod exits 143.
set -euo pipefail

# Signal handlers first of all: as PID 1 a SIGTERM that comes before `trap` runs is dropped by the
# kernel, and the job would then run on until the kubelet's SIGKILL.
child="" received="" early=""
forward() {  # $1: TERM or INT
  if [[ -z "$received" ]] && ! training_started; then
    early=1  # the launcher had not started any training process yet: nothing ran, nothing to lose
  fi
  received="$1"
  if [[ -n "$child" ]]; then
    echo "launch.sh: SIG$1: forwarding it to the training processes (checkpoint, then exit 143)" >&2
    kill -s "$1" -- "-$child" 2>/dev/null || true
  fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="${TRAIN_SCRIPT:-$here/job/train.py}"

training_started() {  # whether a child of the launcher runs the training script (accelerate's or torchrun's)
  local stat fields ppid cmdline
  [[ -n "$child" ]] || return 1
  for stat in /proc/[0-9]*/stat; do
    read -r fields 2>/dev/null <"$stat" || continue
    read -r _ ppid _ <<<"${fields##*) }"  # after "(command name)", which may hold spaces
    [[ "$ppid" == "$child" ]] || continue
    cmdline="$(tr '\0' ' ' 2>/dev/null <"${stat%/stat}/cmdline")" || continue
    [[ "$cmdline" == *"$script"* ]] && return 0
  done
  return 1
}

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
else                                            # Indexed Job, JobSet, plain variables, a single node
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
grace="${TERMINATION_GRACE_PERIOD_SECONDS:-}"
rendezvous_timeout="${RENDEZVOUS_TIMEOUT_SECONDS:-3600}"
for value in "$nnodes" "$node_rank" "$nproc" "$master_port" "$rendezvous_timeout" ${grace:+"$grace"}; do
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
# torchrun's static rendezvous (accelerate's default) reads its join timeout from --rdzv_conf.
(( total > 1 )) && cmd+=(--rdzv_conf "timeout=$rendezvous_timeout")
# Precision and compilation come from the job's config (train.mixed_precision, train.compile).
cmd+=(--mixed_precision no --dynamo_backend no "$script" "$@")

# torchrun SIGKILLs its workers 30 s after forwarding SIGTERM unless told otherwise: accelerate has
# no option for it, but torchrun's LaunchConfig reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT when its
# --shutdown-timeout is unset (torch/distributed/launcher/api.py, LaunchConfig.__post_init__).
# Give the workers the pod's grace period, less 10 s for this script to collect their codes.
if [[ -n "$grace" && -z "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-}" ]]; then
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$(( grace > 20 ? grace - 10 : grace / 2 + 1 ))
fi

if [[ "${LAUNCH_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-}" >&2
  exit 0
fi

JOB_EXIT_CODE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/job-exit-codes.XXXXXX")"
export JOB_EXIT_CODE_DIR

saving=""
(( total > 1 )) && saving=", ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-30} s to save after SIGTERM"
echo "launch.sh: node $node_rank/$nnodes, $nproc process(es) per node, master ${master_addr:-localhost}:$master_port$saving" >&2
set -m                          # job control: the launcher gets a process group of its own
"${cmd[@]}" &
child=$!
set +m
[[ -z "$received" ]] || forward "$received"   # a signal that came before the launcher started

# `wait` returns early (status > 128) when a trapped signal arrives: wait again while it runs.
status=0
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
# If a trapped signal interrupted the last wait after the launcher had ended, bash has its real
# code; 127 means it was already collected above.
if wait "$child" 2>/dev/null; then status=0; else s=$?; (( s == 127 )) || status=$s; fi
if [[ -n "$received" ]]; then
  # One process per node: the launcher died of the signal while the training process saves its
  # checkpoint. Wait for the whole group (the kubelet's SIGKILL bounds this).
  while kill -0 -- "-$child" 2>/dev/null; do sleep 0.5; done
fi

codes=()
for file in "$JOB_EXIT_CODE_DIR"/*.code; do
  [[ -e "$file" ]] || continue
  read -r code <"$file" || true
  [[ "$code" =~ ^[0-9]+$ ]] && codes+=("$code")
done
rm -rf "$JOB_EXIT_CODE_DIR"

exit_code() {
  local code preempted=0 done=0 other=""
  if (( status == 0 )); then echo 0; return; fi
  # SIGTERM while the launcher was still starting (importing torch: seconds): no training process
  # existed to save or lose anything, so this is a preemption, not a crash. Nothing reported by
  # processes that had started stays a crash below (that one may hide a lost checkpoint).
  if [[ -n "$early" ]] && (( ${#codes[@]} == 0 )); then echo 143; return; fi
  for code in "${codes[@]+"${codes[@]}"}"; do
    if (( code == 2 )); then echo 2; return; fi
    if (( code == 143 )); then preempted=$(( preempted + 1 ))
    elif (( code == 0 )); then done=$(( done + 1 ))
    elif [[ -z "$other" ]]; then other="$code"; fi
  done
  # SIGTERM after the last signal check: every process finished the job, whatever the launcher says.
  if (( done == nproc )); then echo 0
  elif (( preempted == nproc )); then echo 143
  elif [[ -n "$other" ]]; then echo "$other"
  elif (( status == 143 )); then echo 1     # the launcher's own death by SIGTERM proves no checkpoint
  else echo "$status"; fi
}
result="$(exit_code)"
[[ -z "$early" ]] || echo "launch.sh: the signal came before any training process had started" >&2
echo "launch.sh: launcher exited $status; training processes reported: ${codes[*]:-nothing}; exit code $result" >&2
exit "$result"
