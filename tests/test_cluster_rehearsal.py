"""The cluster rehearsed on one machine: the rendered Indexed Job's pods run as local processes.

Each "pod" gets exactly the command, arguments and environment the manifest gives it, resolved as
the kubelet would ($(VAR) expansion, the job-name label, JOB_COMPLETION_INDEX from the Job
controller), with three substitutions that stand in for the cluster: the headless Service's DNS
name resolves to 127.0.0.1, the container paths /app, /data and /runs map to local directories,
and the rendezvous port is a free local one (two rehearsals may share a machine).

And like a container, each pod's command runs as PID 1 of a PID namespace of its own
(`unshare --pid --fork --mount-proc`): the kernel drops every signal PID 1 has no handler for, so
this is the only way to see whether the kubelet's SIGTERM reaches the training processes at all.
The SIGTERM goes to that PID 1 from outside, as the kubelet sends it. Where unshare is not
permitted, the PID-1 tests skip and the two-pod tests run the pods as ordinary processes.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import yaml

from helpers.runs import PYTHON, REPO, run
from job.preemption import EXIT_BAD_INPUT, EXIT_PREEMPTED
from job.run_dir import RunDir

pytestmark = pytest.mark.slow
# The one small run (tests/configs/small.yaml), spelled out where it matters here: 540 training
# samples (600 less the validation split), 2 epochs. In batches of 32 on one process, and of 16
# per rank on two pods: 17 steps per epoch either way, so a SIGTERM sent after step 20 lands
# mid epoch 2 with a margin for the steps taken while it travels.
SMALL = "tests/configs/small.yaml"
STEPS_PER_EPOCH = 17  # small.yaml: 540 training images, 32 per batch


@cache
def pid_namespaces() -> str | None:
    """None when `unshare --pid --fork --mount-proc` works here, else why not."""
    try:
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed"
    if proc.returncode != 0:
        return f"`unshare --pid --fork --mount-proc` is not permitted here (needs root or user namespaces): " \
               f"{proc.stderr.strip()}"
    return None


class Pod:
    """One container: ``command`` as PID 1 of a new PID namespace (or a plain process without
    unshare), output in ``log``."""

    def __init__(self, command: list[str], env: dict, log: Path, pid1: bool = True):
        self.log, self.pid1, self._init_pid = log, pid1 and pid_namespaces() is None, None
        # --kill-child: if the test dies, so does the "container" (PID 1 and everything under it)
        prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if self.pid1 else []
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(prefix + command, cwd=REPO, env=env, stdout=handle,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def init_pid(self) -> int:
        """The host PID of the pod's PID 1: unshare's only child."""
        if not self.pid1:
            return self.proc.pid
        if self._init_pid:
            return self._init_pid
        deadline = time.monotonic() + 120  # unshare forks its child at once, or a loaded machine's seconds later
        while time.monotonic() < deadline:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    self._init_pid = int(stat.parent.name)
                    return self._init_pid
            time.sleep(0.1)
        raise AssertionError(f"no child of unshare (pid {self.proc.pid})")

    def terminate(self) -> None:
        """What the kubelet does on preemption, node drain or `kubectl delete`."""
        os.kill(self.init_pid(), signal.SIGTERM)

    def wait_for(self, text: str, timeout: float = 300, count: int = 1) -> None:
        self.init_pid()  # looked up now, so that terminate() follows the text without delay
        deadline = time.time() + timeout
        while self.text().count(text) < count:
            assert time.time() < deadline and self.proc.poll() is None, self.text()[-5000:]
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        """The container's exit code (unshare --fork exits with its child's)."""
        return self.proc.wait(timeout=timeout)


def pod_env(**extra: str) -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "WANDB_SILENT": "true", **extra}


def render_job(name: str, nodes: int) -> dict:
    """The Indexed Job whose pods run here: for several nodes submit.sh renders a JobSet, and this
    is its child Job as the JobSet controller creates it (<jobset>-node-0, its pods in the
    JobSet's headless Service, named after the JobSet)."""
    out = subprocess.run([str(REPO / "k8s" / "submit.sh"), "--dry-run", "--image", "registry.example.com/c:1.0",
                          "--allow-tag", "--name", name, "--nodes", str(nodes), "--gpus", "1", "--config", SMALL, "--",
                          "data.batch_size=16"], capture_output=True, text=True, check=True).stdout
    (job,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("Job", "JobSet")]
    if job["kind"] == "JobSet":
        (replicated,) = job["spec"]["replicatedJobs"]
        child = {"apiVersion": "batch/v1", "kind": "Job", "spec": replicated["template"]["spec"],
                 "metadata": {"name": f"{job['metadata']['name']}-{replicated['name']}-0"}}
        child["spec"]["template"]["spec"]["subdomain"] = job["metadata"]["name"]
        return child
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

    env = pod_env(JOB_COMPLETION_INDEX=str(index))  # injected by the Job controller
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
    assert env["TERMINATION_GRACE_PERIOD_SECONDS"] == str(spec["terminationGracePeriodSeconds"])
    env["MASTER_ADDR"] = "127.0.0.1"  # what the headless Service resolves to
    env["MASTER_PORT"] = str(port)
    (root / "tmp").mkdir(exist_ok=True)
    command = [local(c) for c in container["command"]] + [local(expand(a)) for a in container["args"]]
    return command, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pods(job: dict, root: Path, tag: str) -> list[Pod]:
    port = free_port()
    pods = []
    for index in range(job["spec"]["completions"]):
        command, env = pod_process(job, index, root, port)
        # workingDir is the image's WORKDIR (/app), i.e. the repository root here
        pods.append(Pod(command, env, root / f"pod{index}-{tag}.log"))
    return pods


def wait(pods: list[Pod], timeout: float = 300) -> list[int]:
    deadline = time.time() + timeout
    return [pod.wait(timeout=max(1, deadline - time.time())) for pod in pods]


def prepare_data_volume(root: Path) -> None:
    """What the data-preparation Job does before training (here for the synthetic source)."""
    run([PYTHON, "-m", "job.data", "prepare", "--source", "synthetic", "--root", str(root / "data" / "cifar10"),
         "--out", str(root / "data" / "prepared" / "synthetic"), "--num-train", "600", "--num-test", "200"])


def mid_epoch_checkpoint(out: Path, steps_per_epoch: int) -> str:
    """The one checkpoint a run stopped by SIGTERM in its second epoch leaves: not at an epoch end."""
    names = sorted(p.name for p in RunDir(out).checkpoints.iterdir())
    assert names and names[-1].startswith("epoch0001-"), names
    assert int(names[-1].split("step")[1]) % steps_per_epoch != 0, names
    return names[-1]


def test_two_pods_preempted_through_pid1_then_resume_as_world_size_2(tmp_path):
    """Two pods, torchrun on each: the SIGTERM each node's kubelet sends to PID 1 mid-epoch reaches
    the workers, every node saves the same step and exits 143 (podFailurePolicy: recreate, not
    counted); the recreated pods rendezvous again and finish the run as world size 2."""
    job = render_job("preempted", nodes=2)
    assert job["spec"]["completions"] == 2
    prepare_data_volume(tmp_path)
    pods = start_pods(job, tmp_path, "first")
    pods[1].init_pid()
    pods[0].wait_for("step 20:")  # mid epoch 2
    for pod in pods:
        pod.terminate()
    codes = wait(pods, timeout=300)  # bounds on a hang, sized for a loaded machine
    logs = [pod.text() for pod in pods]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    assert all("training processes reported: 143; exit code 143" in log for log in logs), logs
    out = tmp_path / "runs" / "preempted"
    mid_epoch_checkpoint(out, STEPS_PER_EPOCH)
    assert not RunDir(out).summary_file.exists()

    restarted = start_pods(job, tmp_path, "second")
    codes = wait(restarted)
    logs = [pod.text() for pod in restarted]
    assert codes == [0, 0], logs
    assert "resumed from" in logs[0] and "(epoch 2, sample" in logs[0]
    assert "node 0/2, 1 process(es) per node" in logs[0] and "node 1/2" in logs[1]
    # accelerator.print: once per node (each pod's log tells its story), never once per process
    assert logs[0].count("test accuracy") == 1 and logs[1].count("test accuracy") == 1
    assert all("training processes reported: 0; exit code 0" in log for log in logs), logs
    metrics = RunDir(out).summary()
    assert metrics.world_size == 2 and metrics.test_samples == 200 and metrics.epochs_completed == 2
    history = RunDir(out).epochs()
    assert [h.epoch for h in history] == [0, 1] and history[-1].step == 2 * STEPS_PER_EPOCH
    # tracking.wandb=auto without a key: offline, one W&B run for the job, continued after the restart
    runs = {p.name.rsplit("-", 1)[1] for p in RunDir(out).wandb.glob("offline-run-*")}
    assert len(runs) == 1, runs


@pytest.fixture(params=[1, 2], ids=["1-process", "2-processes"])
def pod_of(request, tmp_path):
    """Start docker/launch.sh as PID 1 with 1 process (the default and the 1-GPU overlay) or 2
    (several GPUs per node: torchrun under it), on a shared small store; returns
    start(tag, *overrides, script=None) -> Pod."""
    if reason := pid_namespaces():
        pytest.skip(reason)
    prepare_data_volume(tmp_path)
    out = tmp_path / "runs" / "pod"

    def start(tag: str, *overrides: str, script: str | None = None) -> Pod:
        env = pod_env(NPROC_PER_NODE=str(request.param), TERMINATION_GRACE_PERIOD_SECONDS="60",
                      MASTER_PORT=str(free_port()), **({"TRAIN_SCRIPT": script} if script else {}))
        command = ["bash", str(REPO / "docker" / "launch.sh"), "--config", SMALL,
                   f"train.output_dir={out}", f"data.prepared_dir={tmp_path / 'data' / 'prepared'}", *overrides]
        return Pod(command, env, tmp_path / f"{tag}.log")

    start.out, start.nproc = out, request.param
    return start


def test_pid1_sigterm_resume_bad_config_and_crash(pod_of):
    """With one process `accelerate launch` runs train.py as a plain child and has no SIGTERM
    handler (as PID 1 it would never even see the signal); with two, torchrun forwards it but
    exits 1. launch.sh must deliver the signal and exit with the job's code: 143 with a
    checkpoint, then the resumed run finishes; 2 for a bad config; a crash's own code."""
    nproc = pod_of.nproc
    steps_per_epoch = {1: STEPS_PER_EPOCH, 2: 9}[nproc]  # 540 images, 32 per process and batch
    pod = pod_of("preempted")
    pod.wait_for(f"step {steps_per_epoch + 3}:")  # mid epoch 2
    pod.terminate()
    assert pod.wait(timeout=300) == EXIT_PREEMPTED, pod.text()[-5000:]
    assert f"reported: {' '.join(['143'] * nproc)}; exit code 143" in pod.text(), pod.text()[-3000:]
    mid_epoch_checkpoint(pod_of.out, steps_per_epoch)
    resumed = pod_of("resumed")
    assert resumed.wait(timeout=300) == 0, resumed.text()[-5000:]
    assert "resumed from" in resumed.text()
    metrics = RunDir(pod_of.out).summary()
    assert metrics.world_size == nproc and metrics.epochs_completed == 2

    bad = pod_of("bad-config", "train.epochs=zero")
    assert bad.wait(timeout=300) == EXIT_BAD_INPUT, bad.text()[-3000:]
    assert "train.epochs" in bad.text()
    crash = pod_of("crash", script=str(REPO / "tests" / "helpers" / "crash_train.py"))
    assert crash.wait(timeout=300) == 1, crash.text()[-3000:]
    assert "illegal memory access" in crash.text()
    assert f"reported: {' '.join(['1'] * nproc)}; exit code 1" in crash.text()


# ---------------------------------------------------------------- the launcher alone, in seconds

def launcher(tmp_path: Path, nproc: int, actions: str, grace: int = 60) -> Pod:
    """docker/launch.sh (as PID 1 where possible) running tests/helpers/exit_with.py: stand-in
    training processes that report ``actions`` (one per rank) like job/train.py does."""
    env = pod_env(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()),
                  TERMINATION_GRACE_PERIOD_SECONDS=str(grace),
                  TRAIN_SCRIPT=str(REPO / "tests" / "helpers" / "exit_with.py"))
    return Pod(["bash", str(REPO / "docker" / "launch.sh"), actions], env, tmp_path / f"{nproc}-{actions}.log")


@pytest.mark.parametrize("nproc,actions,expected", [
    (1, "3", 3),             # one process: `accelerate launch` itself would say 1
    (2, "143,1", 1),         # one crashed, the other was stopped by torchrun: a crash
    (2, "2,143", 2),         # a bad input anywhere decides
    (2, "sigterm,kill", 1),  # one was killed outright (out of memory): no checkpoint is proven
])
def test_launcher_exit_code_is_the_jobs(tmp_path, nproc, actions, expected):
    pod = launcher(tmp_path, nproc, actions)
    assert pod.wait(timeout=120) == expected, pod.text()[-3000:]


def test_sigterm_to_pid1_reaches_every_training_process_of_the_pod(tmp_path):
    """Two processes in one pod (torchrun would report 1): both save, the pod exits 143. With
    real training: test_pid1_sigterm_resume_bad_config_and_crash."""
    if reason := pid_namespaces():
        pytest.skip(reason)
    nproc = 2
    pod = launcher(tmp_path, nproc, "sigterm,sigterm")
    pod.wait_for("waiting", timeout=120, count=nproc)
    assert pod.init_pid() != pod.proc.pid  # the launcher is PID 1 of its namespace, not unshare
    pod.terminate()
    assert pod.wait(timeout=60) == EXIT_PREEMPTED, pod.text()[-3000:]
    assert f"training processes reported: {' '.join(['143'] * nproc)}; exit code 143" in pod.text()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_job_that_finished_as_sigterm_came_exits_0(tmp_path, nproc):
    """SIGTERM after the processes' last signal check: they finish and report 0, while the
    launcher (or torchrun) dies of the signal. The job is done: the pod must not say crash."""
    pod = launcher(tmp_path, nproc, ",".join(["finish"] * nproc))
    pod.wait_for("waiting", timeout=120, count=nproc)
    pod.terminate()
    assert pod.wait(timeout=60) == 0, pod.text()[-3000:]
    assert f"training processes reported: {' '.join(['0'] * nproc)}; exit code 0" in pod.text()


def test_torchrun_gives_the_workers_the_grace_period(tmp_path):
    """TERMINATION_GRACE_PERIOD_SECONDS=8 -> TORCH_ELASTIC_SHUTDOWN_TIMEOUT=5: a worker that needs
    8 s to save is SIGKILLed by torchrun (with its default 30 s it would have finished). So the
    variable reaches torchrun through accelerate, and the pod's 300 s become the workers' 290 s."""
    if reason := pid_namespaces():
        pytest.skip(reason)
    pod = launcher(tmp_path, 2, "slowsave,slowsave", grace=8)
    pod.wait_for("waiting", timeout=120, count=2)
    pod.terminate()
    assert pod.wait(timeout=60) == 1, pod.text()[-3000:]
    assert "5 s to save after SIGTERM" in pod.text() and "reported: nothing" in pod.text()


# A launcher that is still importing torch (seconds on a loaded node) when SIGTERM comes: the
# launcher process (`accelerate`) sleeps before doing anything, so no training process can start.
_SLOW_LAUNCHER = '''
import os, sys, time
if os.path.basename(sys.argv[0]) == "accelerate":
    time.sleep(60)
'''


def _sigterm_handler_installed(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_before_any_training_process_started_exits_143(tmp_path, nproc):
    """Sent to PID 1 at 0.2 s, 1 s and 3 s, while the launcher still starts: nothing ran, nothing
    can be lost, so the pod says preempted (143), not crashed. (Nothing reported by processes that
    had started stays a crash: test_launcher_exit_code_is_the_jobs, ..._grace_period.)"""
    if reason := pid_namespaces():
        pytest.skip(reason)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SLOW_LAUNCHER)
    for delay in (0.2, 1.0, 3.0):
        env = pod_env(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()), PYTHONPATH=str(shim),
                      TRAIN_SCRIPT=str(REPO / "tests" / "helpers" / "exit_with.py"))
        started = time.monotonic()
        pod = Pod(["bash", str(REPO / "docker" / "launch.sh"), "3"], env, tmp_path / f"early-{nproc}-{delay}.log")
        pid = pod.init_pid()
        # the kernel drops a signal PID 1 has no handler for: wait for launch.sh's trap (its first
        # statement), however long a loaded machine takes to start bash, then the rest of the delay
        deadline = time.monotonic() + 60
        while not _sigterm_handler_installed(pid):
            assert time.monotonic() < deadline and pod.proc.poll() is None, pod.text()
            time.sleep(0.01)
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        pod.terminate()
        assert pod.wait(timeout=60) == EXIT_PREEMPTED, (delay, pod.text()[-3000:])
        assert "before any training process had started" in pod.text()
        assert "training processes reported: nothing; exit code 143" in pod.text()


def test_sigterm_after_the_training_process_started_without_a_report_is_a_crash(tmp_path):
    """The other side of the rule above: one training process had started (it prints, then dies
    of the SIGTERM without reporting, as one that lost its checkpoint would): exit 1, not 143."""
    if reason := pid_namespaces():
        pytest.skip(reason)
    script = tmp_path / "silent_train.py"
    script.write_text("import time\nprint('waiting', flush=True)\ntime.sleep(60)\n")
    env = pod_env(NPROC_PER_NODE="1", MASTER_PORT=str(free_port()), TRAIN_SCRIPT=str(script))
    pod = Pod(["bash", str(REPO / "docker" / "launch.sh")], env, tmp_path / "silent.log")
    pod.wait_for("waiting", timeout=120)
    pod.terminate()
    assert pod.wait(timeout=60) == 1, pod.text()[-3000:]
    assert "training processes reported: nothing; exit code 1" in pod.text()
    assert "before any training process had started" not in pod.text()
