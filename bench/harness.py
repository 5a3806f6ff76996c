"""How every benchmark runs a job: the command from the repository root, timed, its output kept in
a log beside the run, its row kept as JSON, and a failure refused with the log's place and tail.
Used by recipe.py, results.py, defaults.py, feature_cache.py and gpu_smoke.py."""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
Row = TypeVar("Row")


class JobFailed(SystemExit):
    """A benchmarked command exited non-zero: ends the script (exit 1) with what failed, where its
    log is and the log's tail; nothing is recorded for it."""


@dataclass(frozen=True)
class Finished:
    stdout: str
    stderr: str
    returncode: int
    wall_seconds: float  # the whole command: start-up included
    # CPU seconds the command used / (wall seconds x cores): near 1 when it had the machine to
    # itself and was compute-bound; well below 1 when other work shared the cores
    cpu_share: float

    @property
    def output(self) -> str:
        """What the log keeps: stdout, then stderr."""
        return self.stdout + self.stderr


def log_beside(out: Path) -> Path:
    """Where a run's log is kept: beside its folder, not inside it (a run that failed before it
    began must not leave a stray file that the job then refuses to overwrite on the retry)."""
    return out.parent / f"{out.name}.log"


def run_job(command: list[str], *, log: Path | None, label: str, timeout: float | None = None,
            check: bool = True) -> Finished:
    """Run ``command`` from the repository root and time it; its output goes to ``log`` (None: not
    kept). ``check``: a non-zero exit raises JobFailed naming ``label`` and the log."""
    start, cpu_before = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    finished = Finished(done.stdout, done.stderr, done.returncode, wall,
                        (_children_cpu() - cpu_before) / (wall * (os.cpu_count() or 1)))
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(finished.output)
    if check and done.returncode != 0:
        where = f"log in {log}" if log is not None else "output"
        raise JobFailed(f"{label} exit {done.returncode}; {where}:\n{finished.output[-3000:]}")
    return finished


def kept_row(path: Path, row_type: type[Row]) -> Row | None:
    """A row recorded before at ``path`` (a finished run is not run again), or None."""
    return row_type(**json.loads(path.read_text())) if path.is_file() else None


def keep_row(path: Path, row: object, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(row), indent=indent) + ("\n" if indent is not None else ""))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
