#!/usr/bin/env bash
# Render the training job for one run and apply it (or print it with --dry-run).
#
#   k8s/submit.sh --image REGISTRY/cifar-transfer@sha256:... --name irv2-ft --nodes 1 --gpus 8
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --name irv2-ft4 --nodes 4 --gpus 8 --spot gke --queue gpu
#   k8s/submit.sh --image ... --name irv2-fe --config job/configs/feature_extraction.yaml -- train.epochs=20
#   k8s/submit.sh --image ... --name irv2-kf --kubeflow --nodes 2 --gpus 8              # Kubeflow TrainJob
#   k8s/submit.sh ... --dry-run > job.yaml                                              # print, do not apply
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --prepare-data --storage-class CLASS
#
#   --image REF               REPO@sha256:DIGEST, or REPO:TAG resolved to its digest (crane, skopeo or
#                             docker buildx imagetools): every node runs the same build
#   --allow-tag               keep REPO:TAG as it is (a tag can move between the nodes' pulls)
#   --nodes N                 N > 1 runs as a JobSet (needs its controller): all nodes restart together
#   --jobset                  a JobSet also for one node
#   --kubeflow                a Kubeflow Trainer TrainJob on our TrainingRuntime (needs the operator)
#   --spot PROVIDER           spot nodes: gke, eks, aks, karpenter, or KEY=VALUE (your pool's label)
#   --gpu-type PROVIDER:TYPE  GPU nodes of one type: gke:nvidia-h100-80gb, eks:p5.48xlarge,
#                             karpenter:h100, aks:Standard_ND96isr_H100_v5, or KEY=VALUE
#   --topology KEY            several nodes: every pod in one domain of this node label
#                             (default topology.kubernetes.io/zone)
#   --interconnect NET        efa or infiniband (k8s/components/efa, k8s/components/infiniband)
#   --queue NAME              Kueue LocalQueue: admitted as a gang, when the whole run fits
#   --max-restarts N          JobSet and TrainJob: restarts of all nodes, preemptions included (10)
#   --namespace NS            where to submit (default: kubectl's current namespace)
#   --priority-class NAME     the pods' priorityClassName
#   --storage-class NAME      with --prepare-data (required): the ReadWriteMany class of both volumes
#                             (`default`: the cluster's default class, if it is ReadWriteMany)
#   --offline                 HF_HUB_OFFLINE=1: use the weights baked into the image, never the Hub
#   --deadline DURATION       activeDeadlineSeconds (default 48h; 90m, 36h, 3d, secs): the whole Job with
#                             its retries; for a JobSet, each attempt (and, with --queue, the total)
#   --ttl DURATION            delete the finished Job or JobSet after this long (default 7d)
#   --replace                 delete an existing run of this name first (it resumes from its checkpoints)
#
# Words after `--` are config overrides (section.key=value) appended to the job's arguments.
# The run name names the Job/Service (cifar-transfer-NAME), the output directory /runs/NAME, the
# W&B run and the pods' label app.kubernetes.io/instance=NAME (for logs and cleanup). Submitting
# the same name again after the Job is gone resumes from its checkpoints.
set -euo pipefail

usage() { sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

image="" name="" nodes=1 gpus=1 spot="" kubeflow=0 jobset=0 dry_run=0 prepare=0 replace=0 offline=0
namespace="" priority_class="" storage_class="" deadline="" ttl="" config="job/configs/finetune.yaml"
allow_tag=0 queue="" max_restarts="" gpu_type="" topology="" interconnect=""
overrides=()
while (($#)); do
  case "$1" in
    --image|--name|--nodes|--gpus|--config|--spot|--namespace|--priority-class|--storage-class|--deadline|--ttl|\
    --queue|--max-restarts|--gpu-type|--topology|--interconnect)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --queue) queue="$2" ;;
        --max-restarts) max_restarts="$2" ;;
        --gpu-type) gpu_type="$2" ;;
        --topology) topology="$2" ;;
        --interconnect) interconnect="$2" ;;
        --image) image="$2" ;;
        --name) name="$2" ;;
        --nodes) nodes="$2" ;;
        --gpus) gpus="$2" ;;
        --config) config="$2" ;;
        --spot) spot="$2" ;;
        --namespace) namespace="$2" ;;
        --priority-class) priority_class="$2" ;;
        --storage-class) storage_class="$2" ;;
        --deadline) deadline="$2" ;;
        --ttl) ttl="$2" ;;
      esac
      shift 2 ;;
    --jobset) jobset=1; shift ;;
    --kubeflow) kubeflow=1; shift ;;
    --offline) offline=1; shift ;;
    --allow-tag) allow_tag=1; shift ;;
    --replace) replace=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --prepare-data) prepare=1; name="${name:-data}"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) echo "submit.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

seconds() {  # $1 option, $2 duration (90m, 36h, 3d or seconds) -> seconds
  [[ "$2" =~ ^([0-9]+)([smhd]?)$ ]] || die "$1 takes a duration such as 90m, 36h, 3d or seconds, got '$2'"
  local n="${BASH_REMATCH[1]}"
  case "${BASH_REMATCH[2]}" in m) n=$(( n * 60 )) ;; h) n=$(( n * 3600 )) ;; d) n=$(( n * 86400 )) ;; esac
  echo "$n"
}
dns_label='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
dns_subdomain='^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$'
label_key='^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'
label_value='^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'
[[ -n "$image" ]] || die "--image REGISTRY/cifar-transfer@sha256:DIGEST (or :TAG) is required"
if [[ "$image" == *@* ]]; then
  digest="${image#*@}" repo="${image%%@*}"
  [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "--image: '$digest' is not a sha256 digest (sha256: and 64 hex digits)"
  [[ "${repo##*/}" != *:* ]] || repo="${repo%:*}"   # REPO:TAG@DIGEST: the digest decides
else
  [[ "${image##*/}" == *:* && "${image##*:}" != "latest" ]] \
    || die "--image needs a digest or an explicit tag other than 'latest' (got '$image'): pods must run a known build"
  repo="${image%:*}" digest=""
fi
[[ -z "$queue" || "$queue" =~ $dns_subdomain ]] || die "--queue must be the name of a Kueue LocalQueue, got '$queue'"
[[ -z "$max_restarts" || "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$max_restarts'"
[[ -z "$topology" || "$topology" =~ $label_key ]] || die "--topology must be a node label key, got '$topology'"
case "$interconnect" in ""|efa|infiniband) ;; *) die "--interconnect takes efa or infiniband, got '$interconnect'" ;; esac
gpu_key="" gpu_value=""
case "$gpu_type" in
  "") ;;
  gke:*) gpu_key=cloud.google.com/gke-accelerator gpu_value="${gpu_type#*:}" ;;
  eks:*|aks:*) gpu_key=node.kubernetes.io/instance-type gpu_value="${gpu_type#*:}" ;;
  karpenter:*) gpu_key=karpenter.k8s.aws/instance-gpu-name gpu_value="${gpu_type#*:}" ;;
  *=*) gpu_key="${gpu_type%%=*}" gpu_value="${gpu_type#*=}" ;;
  *) die "--gpu-type takes gke:TYPE, eks:TYPE, aks:TYPE, karpenter:TYPE or KEY=VALUE, got '$gpu_type'" ;;
esac
[[ -z "$gpu_type" ]] || [[ "$gpu_key" =~ $label_key && "$gpu_value" =~ $label_value ]] \
  || die "--gpu-type: '$gpu_type' is not a valid node label (e.g. gke:nvidia-h100-80gb)"
[[ "$name" =~ ^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$ ]] \
  || die "--name must be 1-32 lowercase letters, digits or '-' (a DNS label), got '$name'"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'"
[[ -z "$namespace" || "$namespace" =~ $dns_label ]] || die "--namespace must be a DNS label, got '$namespace'"
[[ -z "$priority_class" || "$priority_class" =~ $dns_subdomain ]] \
  || die "--priority-class must be the name of a PriorityClass (lowercase DNS name), got '$priority_class'"
[[ -z "$storage_class" || "$storage_class" =~ $dns_subdomain ]] \
  || die "--storage-class must be the name of a StorageClass (lowercase DNS name), got '$storage_class'"
[[ -z "$deadline" ]] || deadline="$(seconds --deadline "$deadline")"
[[ -z "$deadline" || "$deadline" -gt 0 ]] || die "--deadline must be longer than 0"
[[ -z "$ttl" ]] || ttl="$(seconds --ttl "$ttl")"
(( kubeflow + jobset <= 1 )) || die "--kubeflow and --jobset are two different ways to run the nodes: pick one"
(( kubeflow == 0 )) || [[ -z "$spot$gpu_type$topology$interconnect" ]] \
  || die "--spot, --gpu-type, --topology and --interconnect apply to the Job and the JobSet; for a TrainJob, add them to k8s/kubeflow/runtime.yaml"
(( kubeflow == 0 )) || [[ -z "$ttl" ]] \
  || die "--ttl: not for a TrainJob: Trainer recreates a JobSet its TTL deleted (kubeflow/trainer #2981); delete finished TrainJobs yourself"
(( prepare == 0 )) || [[ -z "$spot$priority_class$queue$max_restarts$gpu_type$topology$interconnect" \
                        && $(( kubeflow + jobset + offline )) == 0 ]] \
  || die "--prepare-data takes --image, --namespace, --storage-class, --deadline, --ttl and --replace only"
(( prepare == 0 )) || [[ -n "$storage_class" ]] \
  || die "--prepare-data needs --storage-class: a ReadWriteMany class (NFS, Filestore, EFS, Azure Files, CephFS); on most clusters the default class is block storage and the claims would stay Pending (--storage-class default keeps it anyway)"
(( prepare == 1 )) || [[ -z "$storage_class" ]] || die "--storage-class applies to --prepare-data (the volumes)"
# Several nodes run as a JobSet: it restarts them together. An Indexed Job would recreate a failed
# pod alone, into a rendezvous whose peers hang in a collective (k8s/overlays/multinode, by hand).
(( nodes == 1 || kubeflow == 1 )) || jobset=1
(( jobset == 1 || kubeflow == 1 )) || [[ -z "$max_restarts" ]] \
  || die "--max-restarts applies to the JobSet and the TrainJob (the Indexed Job retries each node: backoffLimitPerIndex)"
(( nodes > 1 )) || [[ -z "$topology" ]] || die "--topology places several nodes together; this run has one"
spot_key="" spot_value="" spot_component=""
case "$spot" in
  "") ;;
  gke|eks|aks|karpenter) spot_component="$spot" ;;
  *=*)
    spot_key="${spot%%=*}" spot_value="${spot#*=}"
    [[ "$spot_key" =~ ^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$ \
       && "$spot_value" =~ ^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$ ]] \
      || die "--spot KEY=VALUE needs a valid node label (e.g. node-lifecycle=spot), got '$spot'" ;;
  *) die "--spot takes gke, eks, aks, karpenter or KEY=VALUE (a node label of your spot pool), got '$spot'" ;;
esac
command -v kubectl >/dev/null || die "kubectl not found: install it (https://kubernetes.io/docs/tasks/tools/)"

# The same build on every node and every restart: a tag resolved once, here, to its digest.
if [[ -z "$digest" ]] && (( ! allow_tag )); then
  resolved="" how=""
  if command -v crane >/dev/null; then
    how=crane resolved="$(crane digest "$image" 2>&1)" || die "crane digest $image failed: $resolved"
  elif command -v skopeo >/dev/null; then
    how=skopeo resolved="$(skopeo inspect --format '{{.Digest}}' "docker://$image" 2>&1)" \
      || die "skopeo inspect docker://$image failed: $resolved"
  elif command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
    how="docker buildx imagetools" resolved="$(docker buildx imagetools inspect --format '{{.Manifest.Digest}}' "$image" 2>&1)" \
      || die "docker buildx imagetools inspect $image failed: $resolved"
  else
    die "--image $image is a tag, which may point at another build by the time each node pulls it, and none of crane, skopeo or docker buildx is here to resolve it: pass REPO@sha256:DIGEST (docker push prints it), or --allow-tag"
  fi
  [[ "$resolved" =~ ^sha256:[0-9a-f]{64}$ ]] || die "$how gave '$resolved' for $image, not a sha256 digest"
  digest="$resolved"
  echo "submit.sh: $image is $repo@$digest" >&2
fi
image_ref="$repo${digest:+@$digest}"
[[ -n "$digest" ]] || image_ref="$image"

k8s="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$k8s/.build/$name"   # inside k8s/ so kustomize may load the bases; git-ignored
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

full="cifar-transfer-$name"
if [[ -n "$digest" ]]; then
  image_entry="{name: ghcr.io/example/cifar-transfer, newName: $repo, digest: \"$digest\"}"
else
  image_entry="{name: ghcr.io/example/cifar-transfer, newName: $repo, newTag: \"${image##*:}\"}"
fi
cpu=$(( gpus * 8 )) mem="$(( gpus * 60 ))Gi" shm="$(( gpus * 8 ))Gi"

args_patch() {  # JSON-patch ops that set the config file and append overrides
  local path="$1"
  printf -- '- op: replace\n  path: %s/1\n  value: %s\n' "$path" "$config"
  for o in "${overrides[@]+"${overrides[@]}"}"; do
    printf -- '- op: add\n  path: %s/-\n  value: "%s"\n' "$path" "${o//\"/\\\"}"
  done
}

common() {  # what every kustomization here starts with: $1 = the resources it builds on
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources: [$1]"
  [[ -z "$namespace" ]] || echo "namespace: $namespace"
}

instance_label() {  # $1: extra field specs (kinds kustomize does not know)
  echo "labels:"
  echo "  - pairs: {app.kubernetes.io/instance: $name}"
  echo "    includeTemplates: true"
  [[ -z "${1:-}" ]] || printf '    fields:\n%s\n' "$1"
}

metadata_patch() {  # $1 apiVersion, $2 kind: the run's Kueue labels on the workload object itself
  [[ -n "$queue" ]] || return 0
  printf 'apiVersion: %s\nkind: %s\nmetadata:\n  name: cifar-transfer\n  labels:\n' "$1" "$2"
  printf '    kueue.x-k8s.io/queue-name: %s\n' "$queue"
  # The JobSet's deadline counts each attempt: Kueue's limit on the total time admitted bounds the run.
  (( ! jobset )) || printf '    kueue.x-k8s.io/max-exec-time-seconds: "%d"\n' "${deadline:-172800}"
}

if (( prepare )); then
  kind=job resource=cifar-prepare
  limits=""
  [[ -z "$deadline" ]] || limits+="- {op: replace, path: /spec/activeDeadlineSeconds, value: $deadline}"$'\n'
  [[ -z "$ttl" ]] || limits+="- {op: replace, path: /spec/ttlSecondsAfterFinished, value: $ttl}"$'\n'
  printf '%s' "$limits" >"$work/limits.yaml"
  echo "- {op: add, path: /spec/storageClassName, value: $storage_class}" >"$work/storage.yaml"
  {
    common ../../data
    echo "images:"
    echo "  - $image_entry"
    echo "patches:"
    [[ -z "$limits" ]] || printf '  - target: {kind: Job, name: cifar-prepare}\n    path: limits.yaml\n'
    [[ "$storage_class" == default ]] || printf '  - target: {kind: PersistentVolumeClaim}\n    path: storage.yaml\n'
  } >"$work/kustomization.yaml"
elif (( kubeflow )); then
  kind=trainjob resource="$full"
  {
    common ../../kubeflow
    echo "nameSuffix: -$name"
    echo "images:"
    echo "  - $image_entry"
    instance_label "      - {kind: TrainJob, create: true, path: spec/runtimePatches/trainingRuntimeSpec/template/spec/replicatedJobs/template/spec/template/metadata/labels}"
    echo "patches:"
    echo "  - target: {kind: TrainJob, name: cifar-transfer}"
    echo "    path: trainjob.yaml"
    if [[ -n "$max_restarts$priority_class" ]]; then
      echo "  - target: {kind: TrainingRuntime, name: cifar-transfer}"
      echo "    path: runtime.yaml"
    fi
    [[ -z "$queue" ]] || printf '  - target: {kind: TrainJob, name: cifar-transfer}\n    path: queue.yaml\n'
  } >"$work/kustomization.yaml"
  metadata_patch trainer.kubeflow.org/v1alpha1 TrainJob >"$work/queue.yaml"
  pod=/spec/runtimePatches/0/trainingRuntimeSpec/template/spec/replicatedJobs/0/template/spec/template/spec
  {
    printf -- '- op: replace\n  path: /spec/trainer/image\n  value: %s\n' "$image_ref"
    printf -- '- op: replace\n  path: /spec/runtimeRef/name\n  value: %s\n' "$full"   # nameSuffix renamed it
    printf -- '- op: replace\n  path: /spec/trainer/numNodes\n  value: %d\n' "$nodes"
    printf -- '- op: replace\n  path: /spec/trainer/numProcPerNode\n  value: %d\n' "$gpus"
    printf -- '- op: replace\n  path: /spec/trainer/resourcesPerNode\n  value:\n'
    printf -- '    requests: {cpu: "%d", memory: %s, ephemeral-storage: 24Gi, nvidia.com/gpu: "%d"}\n' "$cpu" "$mem" "$gpus"
    printf -- '    limits: {cpu: "%d", memory: %s, ephemeral-storage: 24Gi, nvidia.com/gpu: "%d"}\n' "$cpu" "$mem" "$gpus"
    # list items by position: each `test` fails the render if k8s/kubeflow/trainjob.yaml moved one
    printf -- '- op: test\n  path: /spec/trainer/env/0/name\n  value: RUN_NAME\n'
    printf -- '- op: replace\n  path: /spec/trainer/env/0/value\n  value: %s\n' "$name"
    args_patch /spec/trainer/args
    [[ -z "$deadline" ]] || printf -- '- op: replace\n  path: /spec/activeDeadlineSeconds\n  value: %d\n' "$deadline"
    if (( offline )); then
      printf -- '- op: test\n  path: /spec/trainer/env/3/name\n  value: HF_HUB_OFFLINE\n'
      printf -- '- op: replace\n  path: /spec/trainer/env/3/value\n  value: "1"\n'
      printf -- '- op: test\n  path: %s/containers/0/volumeMounts/4/name\n  value: hf-cache\n' "$pod"
      printf -- '- op: remove\n  path: %s/containers/0/volumeMounts/4\n' "$pod"
      printf -- '- op: test\n  path: %s/volumes/4/name\n  value: hf-cache\n' "$pod"
      printf -- '- op: remove\n  path: %s/volumes/4\n' "$pod"
    fi
  } >"$work/trainjob.yaml"
  {  # our TrainingRuntime (k8s/kubeflow/runtime.yaml) carries what a TrainJob cannot set
    runtime_pod=/spec/template/spec/replicatedJobs/0/template/spec/template/spec
    [[ -z "$max_restarts" ]] \
      || printf -- '- op: replace\n  path: /spec/template/spec/failurePolicy/maxRestarts\n  value: %d\n' "$max_restarts"
    [[ -z "$priority_class" ]] \
      || printf -- '- op: add\n  path: %s/priorityClassName\n  value: %s\n' "$runtime_pod" "$priority_class"
  } >"$work/runtime.yaml"
else
  kind=job resource="$full" run="$work" k=../..   # k: the way back to k8s/
  if (( jobset )); then  # the Job rendered in run/, turned into a JobSet by k8s/components/jobset
    kind=jobset run="$work/run" k=../../..
    mkdir "$run"
    {
      common run
      echo "components: [../../components/jobset]"
      echo "patches:"
      echo "  - target: {kind: JobSet}"
      echo "    path: restarts.yaml"
      if (( nodes > 1 )); then
        echo "  - target: {kind: JobSet}"
        echo "    path: exclusive.yaml"
      fi
    } >"$work/kustomization.yaml"
    echo "- {op: replace, path: /spec/failurePolicy/maxRestarts, value: ${max_restarts:-10}}" >"$work/restarts.yaml"
    # JobSet's exclusive placement: the node Job gets a topology domain (a zone, a node pool, a
    # rack) to itself, all its pods together; with the pod affinity below, on any scheduler.
    printf -- '- op: add\n  path: /metadata/annotations\n  value: {alpha.jobset.sigs.k8s.io/exclusive-topology: "%s"}\n' \
      "${topology:-topology.kubernetes.io/zone}" >"$work/exclusive.yaml"
  fi
  {
    common "$k/overlays/1gpu"
    echo "nameSuffix: -$name"
    echo "images:"
    echo "  - $image_entry"
    instance_label
    if [[ -n "$spot$interconnect" ]]; then
      echo "components:"
      [[ -z "$spot" ]] || echo "  - $k/components/spot"
      [[ -z "$spot_component" ]] || echo "  - $k/components/spot/$spot_component"
      [[ -z "$interconnect" ]] || echo "  - $k/components/$interconnect"
    fi
    echo "patches:"
    echo "  - path: job.yaml"
    echo "  - path: service.yaml"
    echo "  - target: {kind: Job, name: cifar-transfer}"
    echo "    path: pod.yaml"
    [[ -z "$queue" ]] || echo "  - path: queue.yaml"
  } >"$run/kustomization.yaml"
  metadata_patch batch/v1 Job >"$run/queue.yaml"
  # Offline: the image's own HF_HOME with the weights baked in at build time, instead of the
  # hf-cache volume that takes Hub downloads.
  hf_mount="" hf_volume="" hf_env=""
  if (( offline )); then
    hf_mount=$'\n          volumeMounts:\n            - {mountPath: /opt/hf-cache, $patch: delete}'
    hf_volume=$'\n        - {name: hf-cache, $patch: delete}'
    hf_env=$'\n            - {name: HF_HUB_OFFLINE, value: "1"}'
  fi
  cat >"$run/job.yaml" <<JOB
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
        - name: trainer$hf_mount
          env:
            - {name: RUN_NAME, value: "$name"}
            - {name: NNODES, value: "$nodes"}
            - {name: NPROC_PER_NODE, value: "$gpus"}
            - {name: SERVICE_NAME, value: "$full"}$hf_env
          resources:
            requests: {cpu: "$cpu", memory: $mem, ephemeral-storage: 24Gi, nvidia.com/gpu: $gpus}
            limits: {cpu: "$cpu", memory: $mem, ephemeral-storage: 24Gi, nvidia.com/gpu: $gpus}
      volumes:
        - name: dshm
          emptyDir: {medium: Memory, sizeLimit: $shm}$hf_volume
JOB
  cat >"$run/service.yaml" <<SERVICE
apiVersion: v1
kind: Service
metadata:
  name: cifar-transfer
spec:
  selector:
    batch.kubernetes.io/job-name: $full
SERVICE
  {
    args_patch /spec/template/spec/containers/0/args
    [[ -z "$deadline" ]] || printf -- '- op: replace\n  path: /spec/activeDeadlineSeconds\n  value: %d\n' "$deadline"
    [[ -z "$ttl" ]] || printf -- '- op: replace\n  path: /spec/ttlSecondsAfterFinished\n  value: %d\n' "$ttl"
    [[ -z "$priority_class" ]] \
      || printf -- '- op: add\n  path: /spec/template/spec/priorityClassName\n  value: %s\n' "$priority_class"
    if [[ -n "$spot_key" ]]; then  # JSON pointer: '~' -> '~0', '/' -> '~1'
      key="${spot_key//\~/\~0}"
      printf -- '- op: add\n  path: /spec/template/spec/nodeSelector/%s\n  value: "%s"\n' "${key//\//\~1}" "$spot_value"
      printf -- '- op: add\n  path: /spec/template/spec/tolerations/-\n'
      printf -- '  value: {key: "%s", operator: Equal, value: "%s", effect: NoSchedule}\n' "$spot_key" "$spot_value"
    fi
    if [[ -n "$gpu_key" ]]; then
      key="${gpu_key//\~/\~0}"
      printf -- '- op: add\n  path: /spec/template/spec/nodeSelector/%s\n  value: "%s"\n' "${key//\//\~1}" "$gpu_value"
    fi
    if (( nodes > 1 )); then  # every node in one topology domain (the first pod picks it)
      printf -- '- op: add\n  path: /spec/template/spec/affinity\n  value:\n    podAffinity:\n'
      printf -- '      requiredDuringSchedulingIgnoredDuringExecution:\n'
      printf -- '        - topologyKey: %s\n' "${topology:-topology.kubernetes.io/zone}"
      printf -- '          labelSelector: {matchLabels: {app.kubernetes.io/instance: "%s"}}\n' "$name"
    fi
  } >"$run/pod.yaml"
fi

rendered="$(kubectl kustomize "$work")"
if (( dry_run )); then
  printf '%s\n' "$rendered"
  exit 0
fi

# Applying a Job that already exists changes nothing ("unchanged", or an error for its immutable
# pod template): say so, and offer to start it again instead.
ns=()
[[ -z "$namespace" ]] || ns=(--namespace "$namespace")
existing="$(kubectl get "$kind" "$resource" "${ns[@]+"${ns[@]}"}" --ignore-not-found -o name)" \
  || die "could not ask the cluster whether $kind/$resource exists (see kubectl's error above)"
if [[ -n "$existing" ]]; then
  if (( ! replace )); then
    die "$kind/$resource already exists${namespace:+ in namespace $namespace}: applying it again would change nothing.
  To start this run again (it resumes from its checkpoints on the runs volume): add --replace
  To follow it: kubectl get pods -l app.kubernetes.io/instance=$name${namespace:+ -n $namespace}"
  fi
  # Foreground: wait until its pods are gone (they save a checkpoint on SIGTERM first), so the new
  # pods never write to /runs/$name next to the old ones.
  echo "submit.sh: deleting $kind/$resource and waiting for its pods to stop" >&2
  kubectl delete "$kind" "$resource" "${ns[@]+"${ns[@]}"}" --cascade=foreground --wait=true
fi
printf '%s\n' "$rendered" | kubectl apply "${ns[@]+"${ns[@]}"}" -f -
n="${namespace:+ -n $namespace}"
if (( prepare )); then
  echo "submitted the data volumes and Job cifar-prepare: kubectl wait --for=condition=complete job/cifar-prepare --timeout=30m$n"
else
  echo "submitted ${kind} $resource: kubectl get pods -l app.kubernetes.io/instance=$name$n"
  echo "  logs of node 0: kubectl logs -f -l app.kubernetes.io/instance=$name,batch.kubernetes.io/job-completion-index=0$n"
fi
