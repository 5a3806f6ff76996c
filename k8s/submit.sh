#!/usr/bin/env bash
# Render the training job for one run and apply it (or print it with --dry-run).
#
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --name irv2-ft --nodes 2 --gpus 8 [--spot]
#   k8s/submit.sh --image ... --name irv2-fe --config job/configs/feature_extraction.yaml -- train.epochs=20
#   k8s/submit.sh --image ... --name irv2-kf --kubeflow --nodes 2 --gpus 8      # Kubeflow TrainJob
#   k8s/submit.sh ... --dry-run > job.yaml                                      # print, do not apply
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --prepare-data          # PVCs + data-prep Job
#
# Words after `--` are config overrides (section.key=value) appended to the job's arguments.
# The run name names the Job/Service (cifar-transfer-NAME), the output directory /runs/NAME and
# the W&B run; submitting the same name again after a failure resumes from its checkpoints.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

image="" name="" nodes=1 gpus=1 spot=0 kubeflow=0 dry_run=0 prepare=0 config="job/configs/finetune.yaml"
overrides=()
while (($#)); do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --kubeflow) kubeflow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --prepare-data) prepare=1; name="${name:-data}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "submit.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

die() { echo "submit.sh: $*" >&2; exit 2; }
[[ -n "$image" ]] || die "--image REGISTRY/cifar-transfer:TAG is required"
[[ "$image" == *:* && "${image##*:}" != "latest" && "${image##*/}" == *:* ]] \
  || die "--image needs an explicit tag other than 'latest' (got '$image'): pods must run a known build"
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$ ]] \
  || die "--name must be 1-32 lowercase letters, digits or '-' (a DNS label), got '$name'"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'"
(( kubeflow == 0 || spot == 0 )) || die "--spot applies to the Indexed Job; for a TrainJob, configure the runtime"
command -v kubectl >/dev/null || die "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/)"

k8s="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$k8s/.build/$name"   # inside k8s/ so kustomize may load the bases; git-ignored
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

repo="${image%:*}" tag="${image##*:}"
full="cifar-transfer-$name"
cpu=$(( gpus * 8 )) mem="$(( gpus * 60 ))Gi" shm="$(( gpus * 8 ))Gi"

args_patch() {  # JSON-patch ops that set the config file and append overrides
  local path="$1"
  printf -- '- op: replace\n  path: %s/1\n  value: %s\n' "$path" "$config"
  for o in "${overrides[@]+"${overrides[@]}"}"; do
    printf -- '- op: add\n  path: %s/-\n  value: "%s"\n' "$path" "${o//\"/\\\"}"
  done
}

if (( prepare )); then
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [../../data]"
    echo "images:"
    echo "  - {name: ghcr.io/example/cifar-transfer, newName: $repo, newTag: \"$tag\"}"
  } >"$work/kustomization.yaml"
elif (( kubeflow )); then
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [../../kubeflow]"
    echo "nameSuffix: -$name"
    echo "patches:"
    echo "  - target: {kind: TrainJob, name: cifar-transfer}"
    echo "    path: trainjob.yaml"
  } >"$work/kustomization.yaml"
  {
    printf -- '- op: replace\n  path: /spec/trainer/image\n  value: %s\n' "$image"
    printf -- '- op: replace\n  path: /spec/trainer/numNodes\n  value: %d\n' "$nodes"
    printf -- '- op: replace\n  path: /spec/trainer/numProcPerNode\n  value: %d\n' "$gpus"
    printf -- '- op: replace\n  path: /spec/trainer/resourcesPerNode\n  value:\n'
    printf -- '    requests: {cpu: "%d", memory: %s, nvidia.com/gpu: "%d"}\n' "$cpu" "$mem" "$gpus"
    printf -- '    limits: {memory: %s, nvidia.com/gpu: "%d"}\n' "$mem" "$gpus"
    printf -- '- op: replace\n  path: /spec/trainer/env/0/value\n  value: %s\n' "$name"
    args_patch /spec/trainer/args
  } >"$work/trainjob.yaml"
else
  base="../../overlays/1gpu"
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources: [$base]"
    echo "nameSuffix: -$name"
    echo "images:"
    echo "  - {name: ghcr.io/example/cifar-transfer, newName: $repo, newTag: \"$tag\"}"
    (( spot )) && echo "components: [../../components/spot]"
    echo "patches:"
    echo "  - path: job.yaml"
    echo "  - path: service.yaml"
    echo "  - target: {kind: Job, name: cifar-transfer}"
    echo "    path: args.yaml"
  } >"$work/kustomization.yaml"
  cat >"$work/job.yaml" <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: cifar-transfer
spec:
  completions: $nodes
  parallelism: $nodes
  template:
    spec:
      subdomain: $full
      containers:
        - name: trainer
          env:
            - {name: RUN_NAME, value: "$name"}
            - {name: NNODES, value: "$nodes"}
            - {name: NPROC_PER_NODE, value: "$gpus"}
            - {name: SERVICE_NAME, value: "$full"}
          resources:
            requests: {cpu: "$cpu", memory: $mem, nvidia.com/gpu: $gpus}
            limits: {memory: $mem, nvidia.com/gpu: $gpus}
      volumes:
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: $shm}
EOF
  cat >"$work/service.yaml" <<EOF
apiVersion: v1
kind: Service
metadata:
  name: cifar-transfer
spec:
  selector:
    batch.kubernetes.io/job-name: $full
EOF
  args_patch /spec/template/spec/containers/0/args >"$work/args.yaml"
fi

rendered="$(kubectl kustomize "$work")"
if (( dry_run )); then
  printf '%s\n' "$rendered"
  exit 0
fi
printf '%s\n' "$rendered" | kubectl apply -f -
if (( prepare )); then
  echo "submitted the data volumes and Job cifar-prepare: kubectl wait --for=condition=complete job/cifar-prepare --timeout=30m"
elif (( kubeflow )); then
  echo "submitted TrainJob $full: kubectl get trainjob $full; kubectl logs -f -l trainer.kubeflow.org/trainjob-name=$full"
else
  echo "submitted Job $full: kubectl get pods -l batch.kubernetes.io/job-name=$full; kubectl logs -f $full-0-<suffix>"
fi
