"""Kubernetes manifests, the container launcher and the Dockerfile, checked offline.

Built-in kinds validate strictly against the Kubernetes 1.32 schemas (kubernetes-validate); the
TrainJob against the Kubeflow Trainer v1alpha1 API models (kubeflow-trainer-api 2.3.0, generated
from the Trainer's OpenAPI spec), with unknown fields rejected.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO

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
    rendered = {t: render(t) for t in [*OVERLAYS, "data", "kubeflow"]}
    rendered["submit 3x4 spot"] = submit("--image", IMAGE, "--name", "exp-7", "--nodes", "3", "--gpus", "4", "--spot",
                                         "--", "train.epochs=5")
    rendered["submit kubeflow"] = submit("--image", IMAGE, "--name", "kf", "--kubeflow", "--nodes", "2", "--gpus", "8")
    rendered["submit data"] = submit("--image", IMAGE, "--prepare-data")
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

    checked = 0
    for target, docs in manifests.items():
        for doc in docs:
            if doc["apiVersion"].startswith("trainer.kubeflow.org"):
                continue
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked == 17  # 4 overlays x (Service, Job), 2 x data (2 PVCs, Job), submit (Service, Job), Secret


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


# ---------------------------------------------------------------- policy

def pod_specs(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(pod spec, trainer container) of every training workload, TrainJobs included."""
    found = []
    for doc in docs:
        if doc["kind"] == "Job" and doc["spec"]["template"]["spec"]["containers"][0]["name"] == "trainer":
            spec = doc["spec"]["template"]["spec"]
            found.append((spec, spec["containers"][0]))
        elif doc["kind"] == "TrainJob":
            trainer = doc["spec"]["trainer"]
            patch = doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            spec = patch["template"]["spec"]["template"]["spec"]
            container = {**spec["containers"][0], "image": trainer["image"], "env": trainer["env"],
                         "resources": trainer["resourcesPerNode"], "args": trainer["args"]}
            found.append((spec, container))
    return found


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("target", [*OVERLAYS, "kubeflow", "submit 3x4 spot", "submit kubeflow"])
def test_training_manifests_follow_policy(manifests, target):
    docs = manifests[target]
    workloads = pod_specs(docs)
    assert len(workloads) == 1
    spec, container = workloads[0]
    # GPUs: limit == processes per node
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    nproc = next(d for d in docs if d["kind"] in ("Job", "TrainJob"))
    per_node = (nproc["spec"]["trainer"]["numProcPerNode"] if nproc["kind"] == "TrainJob"
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
    key = env(container)["WANDB_API_KEY"]
    assert key == {"secretKeyRef": {"name": "wandb", "key": "api-key", "optional": True}}
    # non-root, locked down
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # pinned image, time to checkpoint on SIGTERM
    image = container["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    assert spec["terminationGracePeriodSeconds"] >= 120
    if "NCCL_DEBUG" not in env(container):
        pytest.fail("NCCL settings missing")


@pytest.mark.parametrize("target", OVERLAYS + ["submit 3x4 spot"])
def test_indexed_job_rendezvous_and_failure_policy(manifests, target):
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
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "Ignore" and rules[1]["onExitCodes"]["values"] == [143]
    assert rules[2]["action"] == "FailJob" and rules[2]["onExitCodes"]["operator"] == "NotIn"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_overlay_sizes(manifests):
    sizes = {}
    for target in OVERLAYS + ["submit 3x4 spot"]:
        (job,) = by_kind(manifests[target], "Job")
        container = job["spec"]["template"]["spec"]["containers"][0]
        sizes[target] = (job["spec"]["completions"], container["resources"]["limits"]["nvidia.com/gpu"])
    assert sizes == {"overlays/1gpu": (1, 1), "overlays/8gpu": (1, 8), "overlays/multinode": (2, 8),
                     "overlays/spot": (2, 8), "submit 3x4 spot": (3, 4)}
    (spot,) = by_kind(manifests["overlays/spot"], "Job")
    assert spot["spec"]["template"]["spec"]["tolerations"] and spot["spec"]["template"]["spec"]["nodeSelector"]
    (submitted,) = by_kind(manifests["submit 3x4 spot"], "Job")
    assert submitted["metadata"]["name"] == "cifar-transfer-exp-7"
    assert submitted["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert submitted["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "train.epochs=5"


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
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]


def test_submit_prepare_data_uses_the_given_image(manifests):
    (job,) = by_kind(manifests["submit data"], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert len(by_kind(manifests["submit data"], "PersistentVolumeClaim")) == 2


def test_secret_example_holds_no_real_key(manifests):
    (secret,) = manifests["secret example"]
    assert secret["stringData"]["api-key"] == "REPLACE_WITH_YOUR_WANDB_API_KEY"


@pytest.mark.parametrize("args,message", [
    (["--name", "x"], "--image"),
    (["--image", "reg/cifar:latest", "--name", "x"], "explicit tag"),
    (["--image", "reg/cifar", "--name", "x"], "explicit tag"),
    (["--image", IMAGE, "--name", "Bad_Name"], "DNS label"),
    (["--image", IMAGE, "--name", "x", "--nodes", "0"], "--nodes"),
])
def test_submit_rejects_bad_input(args, message):
    proc = subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


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
    proc = subprocess.run(["bash", str(REPO / "job" / "launch.sh"), *args], env=environment, capture_output=True,
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
    proc = subprocess.run(["bash", str(REPO / "job" / "launch.sh")], env={"PATH": os.environ["PATH"],
                                                                        "LAUNCH_DRY_RUN": "1", **env_vars},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr


# ---------------------------------------------------------------- image

def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(os.sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    assert "USER 1000:1000" in text and 'ENTRYPOINT ["/app/job/launch.sh"]' in text
    assert "FROM python:3.11.11-slim-bookworm" in text  # pinned base
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", "runs", "wandb", ".venv"} <= set(ignored)
    lock = (REPO / "docker" / "requirements.lock").read_text()
    assert "torch==2.14.1" in lock and "nvidia-dali-cuda130==" in lock and "accelerate==" in lock
