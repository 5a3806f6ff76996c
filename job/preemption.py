"""SIGTERM handling and the job's exit codes: what a pod's orchestrator reads.

Exit codes (the container's too, through docker/launch.sh):
  0    done
  2    bad config, data or weights (retrying cannot help)
  143  preempted: a checkpoint was saved, run the same command again to resume
  else a crash (retrying may help: a transient GPU or storage error)

``torchrun`` (under ``accelerate launch --multi_gpu``) reports any failed worker as exit 1, so
each training process also writes its own code to ``$JOB_EXIT_CODE_DIR/<rank>.code`` when the
launcher sets that variable; the launcher turns those files back into the job's exit code.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM: "terminated, restart me"
EXIT_CODE_DIR_ENV = "JOB_EXIT_CODE_DIR"


# What each code means, for the last line a failed job/train.py prints: `accelerate launch` (and
# torchrun under it) reports every failure as exit 1, so the line is where a local user reads it.
EXIT_MEANINGS = {
    EXIT_BAD_INPUT: "bad config, data or weights; nothing was trained. Fix what the error above names: retrying "
                    "cannot help",
    EXIT_PREEMPTED: "preempted by SIGTERM; run the same command again to resume",
    1: "a crash (the traceback above); retrying may help when the cause was transient (a GPU or storage error)",
}


def exit_line(code: int) -> str:
    """The last line of a run that did not finish: what happened and the exit code it means (which
    `accelerate launch` loses; docker/launch.sh maps the codes back for pods)."""
    meaning = EXIT_MEANINGS.get(code, EXIT_MEANINGS[1])
    return f"job/train.py: exit code {code}: {meaning}"


def is_first_process() -> bool:
    """Before the Accelerator exists: whether this process is the launch's rank 0 (or alone)."""
    return os.environ.get("RANK", "0") == "0"


class Preempted(Exception):
    """SIGTERM reached every rank: the one signal for it. Raised where the stop is noticed (the
    training loop's pause, feature extraction), caught once, in ``job/train.py: fit``, which
    saves what there is to save and returns EXIT_PREEMPTED."""


def exit_on_sigterm_during_setup() -> None:
    """Until ``PreemptionSignal`` takes over: SIGTERM during the imports and the Accelerator's
    setup exits 143 at once (nothing to save yet), not 1, which would count as a crash. Called
    first thing by job/train.py, before the heavy imports; this module imports nothing heavy."""

    def stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        record_exit_code(EXIT_PREEMPTED)  # also when this interrupts an import, before main() runs
        raise SystemExit(EXIT_PREEMPTED)

    signal.signal(signal.SIGTERM, stop)


class PreemptionSignal:
    """Records SIGTERM (what Kubernetes sends before it evicts a pod); the loop asks at step
    boundaries, and the decision is made collectively so every rank saves and stops together."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = True

    def requested(self) -> bool:
        """Collective: True on every rank if any rank received SIGTERM."""
        if self.received:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def poll(self, checkpoint_due: bool) -> str | None:
        """Collective, one all-reduce: "preempted" on every rank if any rank received SIGTERM,
        else "checkpoint" if the main process says a timed checkpoint is due (its clock alone
        decides, so the ranks agree), else None."""
        import torch

        acc = self.accelerator
        flags = torch.tensor([float(self.received), float(checkpoint_due and acc.is_main_process)],
                             device=acc.device)
        received, due = acc.reduce(flags, reduction="sum").tolist()
        if received > 0:
            return "preempted"
        return "checkpoint" if due > 0 else None


def record_exit_code(code: int) -> None:
    """Leave this process's exit code where docker/launch.sh looks for it (no-op without it)."""
    directory = os.environ.get(EXIT_CODE_DIR_ENV)
    if not directory:
        return
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    try:
        Path(directory, f"{rank}.code").write_text(f"{code}\n")
    except OSError:
        pass  # the launcher then falls back to the launcher's own exit code
