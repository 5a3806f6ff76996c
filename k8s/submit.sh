#!/usr/bin/env bash
# Render the training job for one run and apply it (or print it with --dry-run).
#
#   k8s/submit.sh --image REGISTRY/cifar-transfer@sha256:... --name irv2-ft --nodes 1 --gpus 8
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --name irv2-ft4 --nodes 4 --gpus 8 --spot gke --queue gpu
#   k8s/submit.sh --image ... --name small --gpus 1 --cpu-per-gpu 6 --mem-per-gpu 24 --ephemeral 8Gi   # the defaults
#   k8s/submit.sh --image ... --name irv2-fe --config job/configs/feature_extraction.yaml -- train.epochs=20
#   k8s/submit.sh --image ... --name irv2-kf --kubeflow --nodes 2 --gpus 8              # Kubeflow TrainJob
#   k8s/submit.sh ... --dry-run > job.yaml                                              # print, do not apply
#   k8s/submit.sh --image REGISTRY/cifar-transfer:0.1.0 --prepare-data --storage-class CLASS
#
#   --image REF               REPO@sha256:DIGEST, or REPO:TAG resolved to its digest (crane, skopeo or
#                             docker buildx imagetools): every node runs the same build
#   --allow-tag               keep REPO:TAG as it is (a tag can move between the nodes' pulls)
#   --nodes N                 N > 1 runs as a JobSet (needs its controller): all nodes restart together;
#                             started as a gang with --queue or --coscheduling (else: --rendezvous-timeout)
#   --cpu-per-gpu N           whole CPUs per GPU (default 6), --mem-per-gpu GIB memory per GPU (default
#                             24): requests = limits (Guaranteed QoS); the defaults fit 8 vCPU / 32 GB
#                             one-GPU nodes (g5/g6.2xlarge, g2-standard-8) after the kubelet's reservations
#   --ephemeral SIZE          the pod's ephemeral-storage, e.g. 8Gi (default; with --queue none: a
#                             typical ClusterQueue does not cover it), or none
#   --jobset                  a JobSet also for one node
#   --kubeflow                a Kubeflow Trainer TrainJob on our TrainingRuntime (needs the operator)
#   --spot PROVIDER           spot nodes: gke, eks, aks, karpenter, or KEY=VALUE (your pool's label)
#   --gpu-type PROVIDER:TYPE  GPU nodes of one type: gke:nvidia-h100-80gb, eks:p5.48xlarge,
#                             karpenter:h100, aks:Standard_ND96isr_H100_v5, or KEY=VALUE
#   --topology KEY            several nodes: every pod in one domain of this node label (default
#                             topology.kubernetes.io/zone); a label narrower than a zone (node pool,
#                             rack, block) also gets JobSet's exclusive placement on it
#   --interconnect NET        efa or infiniband (k8s/components/efa, k8s/components/infiniband)
#   --efa N                   EFA adapters per pod (default: from --gpu-type eks:TYPE, e.g. 32 on p5.48xlarge)
#   --network-attachment NAME Multus secondary network(s) of the pods (RoCE over SR-IOV): k8s.v1.cni.cncf.io/networks
#   --queue NAME              Kueue LocalQueue: admitted as a gang, when the whole run fits
#                             (sample ClusterQueue: k8s/kueue)
#   --coscheduling            --kubeflow, several nodes: gang-scheduled by the scheduler-plugins
#                             Coscheduling plugin (the runtime's podGroupPolicy)
#   --rendezvous-timeout DURATION  how long nodes wait for each other at start (default 1h with a gang;
#                             15m for several nodes without one: pods that got GPUs give them back sooner)
#   --service-account NAME    the pods' serviceAccountName (its token is still not mounted)
#   --image-pull-secret NAME  the pods' imagePullSecrets (a private registry)
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

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-0}"; }
die() { echo "submit.sh: $*" >&2; exit 2; }

image="" name="" nodes=1 gpus=1 spot="" kubeflow=0 jobset=0 dry_run=0 prepare=0 replace=0 offline=0
namespace="" priority_class="" storage_class="" deadline="" ttl="" config="job/configs/finetune.yaml"
allow_tag=0 queue="" max_restarts="" gpu_type="" topology="" interconnect=""
cpu_per_gpu=6 mem_per_gpu=24 ephemeral="" efa="" network="" coscheduling=0 service_account="" pull_secret=""
rendezvous=""
overrides=()
while (($#)); do
  case "$1" in
    --image|--name|--nodes|--gpus|--config|--spot|--namespace|--priority-class|--storage-class|--deadline|--ttl|\
    --queue|--max-restarts|--gpu-type|--topology|--interconnect|--cpu-per-gpu|--mem-per-gpu|--ephemeral|--efa|\
    --network-attachment|--service-account|--image-pull-secret|--rendezvous-timeout)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --cpu-per-gpu) cpu_per_gpu="$2" ;;
        --mem-per-gpu) mem_per_gpu="$2" ;;
        --ephemeral) ephemeral="$2" ;;
        --efa) efa="$2" ;;
        --network-attachment) network="$2" ;;
        --service-account) service_account="$2" ;;
        --image-pull-secret) pull_secret="$2" ;;
        --rendezvous-timeout) rendezvous="$2" ;;
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
    --coscheduling) coscheduling=1; shift ;;
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
(( kubeflow == 0 )) || [[ -z "$spot$gpu_type$topology$interconnect$network" ]] \
  || die "--spot, --gpu-type, --topology, --interconnect and --network-attachment apply to the Job and the JobSet; for a TrainJob, add them to k8s/kubeflow/runtime.yaml"
(( kubeflow == 0 )) || [[ -z "$ttl" ]] \
  || die "--ttl: not for a TrainJob: Trainer recreates a JobSet its TTL deleted (kubeflow/trainer #2981); delete finished TrainJobs yourself"
(( prepare == 0 )) || [[ -z "$spot$priority_class$queue$max_restarts$gpu_type$topology$interconnect$efa$network$rendezvous" \
                        && $(( kubeflow + jobset + offline + coscheduling )) == 0 ]] \
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
[[ "$cpu_per_gpu" =~ ^[1-9][0-9]*$ ]] \
  || die "--cpu-per-gpu takes whole CPUs (Guaranteed QoS: the static CPU manager pins whole cores), got '$cpu_per_gpu'"
[[ "$mem_per_gpu" =~ ^[1-9][0-9]*$ ]] || die "--mem-per-gpu takes whole GiB per GPU, e.g. 24, got '$mem_per_gpu'"
(( mem_per_gpu >= 8 )) \
  || die "--mem-per-gpu $mem_per_gpu: a training process, its DALI pipeline and its share of /dev/shm need 8 GiB or more"
scratch=6   # GiB the disk-backed emptyDirs may hold: tmp 2 Gi + hf-cache 4 Gi (k8s/base/train-job.yaml)
(( ! offline )) || scratch=2
if [[ -z "$ephemeral" ]]; then
  # A typical Kueue ClusterQueue covers cpu, memory and GPUs only, and Kueue refuses a workload
  # that asks for anything else: with --queue, ask for no ephemeral-storage unless told to.
  ephemeral=8
  [[ -z "$queue" ]] || ephemeral=none
elif [[ "$ephemeral" != none ]]; then
  [[ "$ephemeral" =~ ^([1-9][0-9]*)(Gi)?$ ]] || die "--ephemeral takes whole GiB such as 8Gi, or none, got '$ephemeral'"
  ephemeral="${BASH_REMATCH[1]}"
  (( ephemeral > scratch )) \
    || die "--ephemeral ${ephemeral}Gi: the pod's emptyDirs alone may hold $scratch GiB (tmp 2 Gi, hf-cache 4 Gi) besides its logs: ask for more, or none"
fi
[[ -z "$efa" || "$efa" =~ ^[1-9][0-9]*$ ]] || die "--efa takes a number of EFA adapters, got '$efa'"
[[ -z "$efa" || "$interconnect" == efa ]] || die "--efa N goes with --interconnect efa"
efa_adapters() {  # $1: EC2 instance type -> its EFA-capable network cards (AWS EC2 instance specifications)
  case "$1" in
    p5.48xlarge|p5e.48xlarge) echo 32 ;;
    p5en.48xlarge) echo 16 ;;
    p4d.24xlarge|p4de.24xlarge|g6e.48xlarge) echo 4 ;;
    p3dn.24xlarge|g4dn.8xlarge|g4dn.12xlarge|g4dn.16xlarge|g4dn.metal|\
    g5.8xlarge|g5.12xlarge|g5.16xlarge|g5.24xlarge|g5.48xlarge|\
    g6.8xlarge|g6.12xlarge|g6.16xlarge|g6.24xlarge|g6.48xlarge|g6e.8xlarge|g6e.12xlarge|g6e.16xlarge|g6e.24xlarge) echo 1 ;;
  esac
}
if [[ "$interconnect" == efa && -z "$efa" ]]; then
  [[ "$gpu_type" != eks:* ]] || efa="$(efa_adapters "${gpu_type#eks:}")"
  [[ -n "$efa" ]] || die "--interconnect efa: how many EFA adapters has each node? Name the instance type with --gpu-type eks:TYPE (p4d.24xlarge: 4, p5.48xlarge: 32, p5en.48xlarge: 16, ...) or give --efa N"
fi
[[ -z "$network" || "$network" =~ ^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?(,([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?)*$ ]] \
  || die "--network-attachment takes NetworkAttachmentDefinition names (NAME or NAMESPACE/NAME, comma-separated), got '$network'"
[[ -z "$service_account" || "$service_account" =~ $dns_subdomain ]] \
  || die "--service-account must be the name of a ServiceAccount (lowercase DNS name), got '$service_account'"
[[ -z "$pull_secret" || "$pull_secret" =~ $dns_subdomain ]] \
  || die "--image-pull-secret must be the name of a Secret (lowercase DNS name), got '$pull_secret'"
(( coscheduling == 0 || kubeflow == 1 )) \
  || die "--coscheduling is Kubeflow Trainer's podGroupPolicy: add --kubeflow, or use --queue (Kueue) for a JobSet"
[[ -z "$queue" ]] || (( coscheduling == 0 )) || die "--queue and --coscheduling are two ways to start several nodes as a gang: pick one"
(( nodes > 1 )) || (( coscheduling == 0 )) || die "--coscheduling gang-schedules several nodes; this run has one"
[[ -z "$rendezvous" ]] || rendezvous="$(seconds --rendezvous-timeout "$rendezvous")"
[[ -z "$rendezvous" || "$rendezvous" -gt 0 ]] || die "--rendezvous-timeout must be longer than 0"
# Without a gang the pods are scheduled one at a time: when capacity is short, the first nodes hold
# their GPUs through the whole rendezvous wait, fail, and each attempt spends one of the restarts.
# Waiting 15 minutes instead of the hour a gang's admission may take bounds that (docs/KUBERNETES.md).
if (( nodes > 1 && prepare == 0 )) && [[ -z "$queue" ]] && (( coscheduling == 0 )); then
  echo "submit.sh: $nodes nodes without a gang: the pods are scheduled one at a time, and nodes wait ${rendezvous:-900} s for each other (--rendezvous-timeout). Kueue admits them all at once: --queue LOCALQUEUE (sample: k8s/kueue)" >&2
  rendezvous="${rendezvous:-900}"
fi
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
# Guaranteed QoS: requests = limits. /dev/shm is memory-backed, counted in the memory limit: a
# quarter of it at most.
cpu=$(( gpus * cpu_per_gpu )) mem="$(( gpus * mem_per_gpu ))Gi" shm="$(( gpus * (mem_per_gpu / 4) ))Gi"
disk=""
[[ "$ephemeral" == none ]] || disk=", ephemeral-storage: ${ephemeral}Gi"

policies_patches() {  # kustomization entries: the PDB and NetworkPolicy select this run's pods
  printf '  - target: {kind: PodDisruptionBudget}\n    path: pdb.yaml\n'
  printf '  - target: {kind: NetworkPolicy}\n    path: networkpolicy.yaml\n'
  (( ! pdb_delete )) || printf '  - target: {kind: PodDisruptionBudget}\n    path: pdb-delete.yaml\n'
}
# AWS's Node Termination Handler and Karpenter drain a reclaimed spot node through the eviction
# API: a PDB would block that drain until the instance is gone, and the pods would get no SIGTERM.
pdb_delete=0
[[ "$spot_component" != eks && "$spot_component" != karpenter ]] || pdb_delete=1
write_policies() {  # $1: directory
  local key=app.kubernetes.io~1instance
  printf -- '- {op: replace, path: /spec/selector/matchLabels/%s, value: "%s"}\n' "$key" "$name" >"$1/pdb.yaml"
  printf '$patch: delete\napiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: any\n' \
    >"$1/pdb-delete.yaml"
  {
    printf -- '- {op: replace, path: /spec/podSelector/matchLabels/%s, value: "%s"}\n' "$key" "$name"
    printf -- '- {op: replace, path: /spec/ingress/0/from/0/podSelector/matchLabels/%s, value: "%s"}\n' "$key" "$name"
  } >"$1/networkpolicy.yaml"
}

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
    echo "  - target: {kind: TrainingRuntime, name: cifar-transfer}"
    echo "    path: runtime.yaml"
    [[ -z "$queue" ]] || printf '  - target: {kind: TrainJob, name: cifar-transfer}\n    path: queue.yaml\n'
    policies_patches
  } >"$work/kustomization.yaml"
  write_policies "$work"
  metadata_patch trainer.kubeflow.org/v1alpha1 TrainJob >"$work/queue.yaml"
  pod=/spec/runtimePatches/0/trainingRuntimeSpec/template/spec/replicatedJobs/0/template/spec/template/spec
  {
    printf -- '- op: replace\n  path: /spec/trainer/image\n  value: %s\n' "$image_ref"
    printf -- '- op: replace\n  path: /spec/runtimeRef/name\n  value: %s\n' "$full"   # nameSuffix renamed it
    printf -- '- op: replace\n  path: /spec/trainer/numNodes\n  value: %d\n' "$nodes"
    printf -- '- op: replace\n  path: /spec/trainer/numProcPerNode\n  value: %d\n' "$gpus"
    printf -- '- op: replace\n  path: /spec/trainer/resourcesPerNode\n  value:\n'
    printf -- '    requests: {cpu: "%d", memory: %s%s, nvidia.com/gpu: "%d"}\n' "$cpu" "$mem" "$disk" "$gpus"
    printf -- '    limits: {cpu: "%d", memory: %s%s, nvidia.com/gpu: "%d"}\n' "$cpu" "$mem" "$disk" "$gpus"
    printf -- '- op: test\n  path: %s/volumes/2/name\n  value: dshm\n' "$pod"
    printf -- '- op: replace\n  path: %s/volumes/2/emptyDir/sizeLimit\n  value: %s\n' "$pod" "$shm"
    if [[ -n "$rendezvous" ]]; then
      printf -- '- op: test\n  path: /spec/trainer/env/15/name\n  value: RENDEZVOUS_TIMEOUT_SECONDS\n'
      printf -- '- op: replace\n  path: /spec/trainer/env/15/value\n  value: "%d"\n' "$rendezvous"
    fi
    [[ -z "$service_account" ]] \
      || printf -- '- op: add\n  path: %s/serviceAccountName\n  value: %s\n' "$pod" "$service_account"
    [[ -z "$pull_secret" ]] \
      || printf -- '- op: add\n  path: %s/imagePullSecrets\n  value: [{name: %s}]\n' "$pod" "$pull_secret"
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
    if [[ "$ephemeral" == none ]]; then   # the init container asks for none either (Kueue sums it too)
      printf -- '- op: remove\n  path: %s/initContainers/0/resources/%s/ephemeral-storage\n' \
        "$runtime_pod" requests "$runtime_pod" limits
    fi
    # The scheduler-plugins Coscheduling plugin places all nodes' pods or none; pods that got a
    # node wait at most this long for the others, then give it back and queue again.
    (( ! coscheduling )) \
      || printf -- '- op: add\n  path: /spec/podGroupPolicy\n  value: {coscheduling: {scheduleTimeoutSeconds: 300}}\n'
    printf -- '- op: test\n  path: /kind\n  value: TrainingRuntime\n'   # never an empty patch
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
      if [[ -n "$topology" && ! "$topology" =~ ^(topology\.kubernetes\.io|failure-domain\.beta\.kubernetes\.io)/(zone|region)$ ]]; then
        echo "  - target: {kind: JobSet}"
        echo "    path: exclusive.yaml"
      fi
    } >"$work/kustomization.yaml"
    echo "- {op: replace, path: /spec/failurePolicy/maxRestarts, value: ${max_restarts:-10}}" >"$work/restarts.yaml"
    # JobSet's exclusive placement: the node Job gets a topology domain (a node pool, a rack, a
    # block) to itself, all its pods together. Never a zone (or a region): JobSet's webhook gives
    # the leader pod a required anti-affinity to every other JobSet's pods in that domain, so one
    # run would lock every other JobSet and TrainJob out of the zone, and be locked out by them.
    printf -- '- op: add\n  path: /metadata/annotations\n  value: {alpha.jobset.sigs.k8s.io/exclusive-topology: "%s"}\n' \
      "$topology" >"$work/exclusive.yaml"
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
    policies_patches
  } >"$run/kustomization.yaml"
  write_policies "$run"
  metadata_patch batch/v1 Job >"$run/queue.yaml"
  # Offline: the image's own HF_HOME with the weights baked in at build time, instead of the
  # hf-cache volume that takes Hub downloads.
  hf_mount="" hf_volume="" hf_env="" extra_env=""
  [[ -z "$rendezvous" ]] || extra_env=$'\n'"            - {name: RENDEZVOUS_TIMEOUT_SECONDS, value: \"$rendezvous\"}"
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
            - {name: SERVICE_NAME, value: "$full"}$hf_env$extra_env
          resources:
            requests: {cpu: "$cpu", memory: $mem$disk, nvidia.com/gpu: $gpus}
            limits: {cpu: "$cpu", memory: $mem$disk, nvidia.com/gpu: $gpus}
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
    [[ -z "$service_account" ]] \
      || printf -- '- op: add\n  path: /spec/template/spec/serviceAccountName\n  value: %s\n' "$service_account"
    [[ -z "$pull_secret" ]] \
      || printf -- '- op: add\n  path: /spec/template/spec/imagePullSecrets\n  value: [{name: %s}]\n' "$pull_secret"
    [[ -z "$network" ]] || printf -- '- op: add\n  path: /spec/template/metadata/annotations/k8s.v1.cni.cncf.io~1networks\n  value: "%s"\n' "$network"
    if [[ "$ephemeral" == none ]]; then   # the base asks for it: not on a queue that cannot cover it
      for c in containers/0 initContainers/0; do
        printf -- '- op: remove\n  path: /spec/template/spec/%s/resources/%s/ephemeral-storage\n' "$c" requests "$c" limits
      done
    fi
    if [[ -n "$efa" ]]; then   # k8s/components/efa asks for p4d's 4
      for side in requests limits; do
        printf -- '- op: replace\n  path: /spec/template/spec/containers/0/resources/%s/vpc.amazonaws.com~1efa\n  value: %d\n' "$side" "$efa"
      done
    fi
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
