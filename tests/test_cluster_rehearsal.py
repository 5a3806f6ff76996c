"""The cluster rehearsed on one machine: the rendered 2-node Indexed Job, run as two local processes.

Each "pod" gets exactly the command, arguments and environment the manifest gives it, resolved as
the kubelet would ($(VAR) expansion, the job-name label, JOB_COMPLETION_INDEX from the Job
controller), with three substitutions that stand in for the cluster: the headless Service's DNS
name resolves to 127.0.0.1, the container paths /app, /data and /runs map to local directories,
and the rendezvous port is a free local one (two rehearsals may share a machine).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, run

pytestmark = pytest.mark.slow
OVERRIDES = ["model.name=test_resnet", "data.synthetic_train=2000", "data.synthetic_test=300", "train.epochs=3",
             "train.log_every=1", "train.signal_check_every=1", "data.num_threads=1", "tracking.wandb=offline",
             "model.head_hidden=[64]"]


def render_two_node_job(name: str) -> dict:
    out = subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", "--image", "registry.example.com/c:1.0",
                          "--name", name, "--nodes", "2", "--gpus", "1", "--config", "job/configs/demo.yaml",
                          "--", *OVERRIDES], capture_output=True, text=True, check=True).stdout
    (job,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Job"]
    return job


def pod_process(job: dict, index: int, root: Path, port: int) -> tuple[list[str], dict]:
    """The command line and environment of pod ``index``, resolved like the kubelet does."""
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    paths = {"/app/": f"{REPO}/", "/data": str(root / "data"), "/runs": str(root / "runs"), "/tmp": str(root / "tmp")}

    def local(value: str) -> str:
        for container_path, host_path in paths.items():  # at most one mount per value
            if value.startswith(container_path) or f"={container_path}" in value:
                return value.replace(container_path, host_path, 1)
        return value

    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
           "WANDB_SILENT": "true", "JOB_COMPLETION_INDEX": str(index)}  # injected by the Job controller
    expand = lambda s: re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), s)  # noqa: E731
    service = spec["subdomain"]
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = local(expand(item["value"]))
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
            env[item["name"]] = job["metadata"]["name"]
        else:  # the optional W&B Secret does not exist here: the variable stays unset
            assert item["valueFrom"]["secretKeyRef"]["optional"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service}"
    env["MASTER_ADDR"] = "127.0.0.1"  # what the headless Service resolves to
    env["MASTER_PORT"] = str(port)
    command = [local(c) for c in container["command"]] + [local(expand(a)) for a in container["args"]]
    return command, env


def start_pods(job: dict, root: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pods = []
    for index in range(job["spec"]["completions"]):
        command, env = pod_process(job, index, root, port)
        log = root / f"pod{index}-{tag}.log"
        handle = open(log, "w")
        # workingDir is the image's WORKDIR (/app), i.e. the repository root here
        pods.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT), log))
    return pods


def wait(pods, timeout: float = 400) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc, _ in pods:
        codes.append(proc.wait(timeout=max(1, deadline - time.time())))
    return codes


def prepare_data_volume(root: Path) -> None:
    """What the data-preparation Job does before training (here for the demo's synthetic source)."""
    run([PYTHON, "-m", "job.data", "prepare", "--source", "synthetic", "--root", str(root / "data" / "cifar10"),
         "--out", str(root / "data" / "prepared" / "synthetic"), "--num-train", "2000", "--num-test", "300"])


def test_two_pods_rendezvous_train_as_world_size_2(tmp_path):
    job = render_two_node_job("rehearsal")
    assert job["spec"]["completions"] == 2
    prepare_data_volume(tmp_path)
    pods = start_pods(job, tmp_path, "run")
    codes = wait(pods)
    logs = [log.read_text() for _, log in pods]
    assert codes == [0, 0], logs
    out = tmp_path / "runs" / "rehearsal"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_samples"] == 300 and metrics["epochs_completed"] == 3
    assert "node 0/2, 1 process(es) per node" in logs[0] and "node 1/2" in logs[1]
    # accelerator.print: once per node (each pod's log tells its story), never once per process
    assert logs[0].count("test accuracy") == 1 and logs[1].count("test accuracy") == 1
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


def test_sigterm_to_both_pods_then_restart_resumes(tmp_path):
    job = render_two_node_job("preempted")
    prepare_data_volume(tmp_path)
    pods = start_pods(job, tmp_path, "first")
    log0 = pods[0][1]
    deadline = time.time() + 300
    while "step 20:" not in log0.read_text():  # mid epoch 2 (15 steps per epoch)
        assert time.time() < deadline and pods[0][0].poll() is None, log0.read_text()
        time.sleep(0.2)
    for proc, _ in pods:
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends each pod on preemption
    codes = wait(pods, timeout=120)
    assert all(code != 0 for code in codes), codes  # non-zero: the Job recreates the pods
    out = tmp_path / "runs" / "preempted"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert any(not name.endswith("step0000015") and not name.endswith("step0000030") for name in checkpoints), \
        checkpoints  # a mid-epoch checkpoint was written on SIGTERM
    assert not (out / "metrics.json").exists()
    restarted = start_pods(job, tmp_path, "second")
    assert wait(restarted) == [0, 0], [log.read_text() for _, log in restarted]
    log = restarted[0][1].read_text()
    assert "resumed from" in log and "epoch 1, batch" in log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs_completed"] == 3
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[-1]["step"] == 45
