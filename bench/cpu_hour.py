"""Time to accuracy: runs one training command of the job, times it from launch to exit (data
preparation included), records its CPU share, reads what the run reached from its own files, and
appends one record to docs/results/time_to_accuracy.jsonl (named in bench/time_to_accuracy.py).

    python bench/cpu_hour.py --root DIR                 # the one-hour preset, label cpu_hour
    python bench/cpu_hour.py --config job/configs/cpu_hour.yaml --root DIR --label cpu_hour \
        -- train.seed=1 data.split_seed=1 train.output_dir=runs/cpu_hour-seed1
    python bench/cpu_hour.py --root DIR --label lever:ema:on -- ema.epochs=0.5 train.output_dir=runs/lever-ema-on
    python bench/cpu_hour.py --record-existing RUN_DIR --wall-log LOG --command "python job/train.py ..." \
        [--cwd CHECKOUT] [--label LABEL]
    make results-doc                                    # then: the plot and docs/RESULTS.md's section

The command is ``python job/train.py --config CONFIG [data.source=folder data.root=DIR] OVERRIDES``,
run from the repository root (paths in OVERRIDES are relative to it), as the README spells it: the
wall time is the whole command's. The CPU share is the command's CPU seconds (getrusage of the
children) over wall seconds x os.cpu_count(): near 1 when it had the cores to itself; the load
average just before launch says whether anything else was running. A run folder that holds an
earlier run is refused (it would resume, and the time would not be the whole command's): give a
new train.output_dir or train.resume=never. Whether the prepared store existed at launch (so the
command skipped preparing it) is recorded.

Labels: ``cpu_hour`` for the preset as the README runs it (seeds included), ``lever:<name>:off``
and ``lever:<name>:on`` for a lever measured both ways (paired in docs/RESULTS.md), any other
name for anything else. ``--record-existing`` records a run made outside this script with the same
command (its wall time from the ``WALL_SECONDS <s> rc=<n>`` line its wrapper logged, or
``--wall-seconds``): the command must resolve to the config the run saved, and its figures are
read from its files as above. Every refusal exits 2 naming the problem and the fix; nothing is
recorded then.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import contextlib
import dataclasses
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import time_to_accuracy
from bench.harness import REPO, log_beside
from job.config import BadInput, Config, load_config
from job.run_dir import RunDir

ENTRY = "job/train.py"
WALL_LINE = re.compile(r"WALL_SECONDS\s+([0-9]*\.?[0-9]+)(?:\s+rc=(-?\d+))?")


class Refused(Exception):
    """Nothing is recorded: the message names what is wrong and the fix (exit 2)."""


@dataclass(frozen=True)
class Invocation:
    """How a run was made and timed: what its own files do not say."""
    label: str
    command: str
    config: str
    overrides: list[str]
    wall_seconds: float
    wall_measured_by: str
    cpu_seconds: float | None = None
    load_average_before: float | None = None
    store_existed_at_launch: bool | None = None
    commit: str | None = None
    dirty: bool | None = None


@dataclass(frozen=True)
class Launched:
    returncode: int
    wall_seconds: float  # launch to exit
    cpu_seconds: float  # user + system of the command and the children it waited for
    load_average_before: float


def relative(text: str) -> str:
    """Paths inside the repository as any checkout spells them (the job runs from its root)."""
    return text.replace(f"{REPO}/", "")


def resolve(config: Path, overrides: list[str], cwd: Path = REPO) -> Config:
    """The config the job will resolve (or did): the file, then the overrides, paths from ``cwd``."""
    try:
        with contextlib.chdir(cwd):
            return load_config(config, overrides)
    except BadInput as e:
        raise Refused(f"{e}; fix the config or the overrides") from None


def launch(argv: list[str], log: Path) -> Launched:
    """Run ``argv`` from the repository root, its output shown and kept in ``log``, timed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    before = _children_cpu()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as kept:
        # unbuffered: the job's lines show as they come (the log is the same either way)
        process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            sys.stdout.write(line)
            kept.write(line)
        returncode = process.wait()
    wall = time.perf_counter() - start
    return Launched(returncode, wall, _children_cpu() - before, load)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def git_state(checkout: Path) -> tuple[str | None, bool | None]:
    """HEAD of ``checkout`` and whether its tracked files differ from it (None, None: not a checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, bool(changed)


def record_of(run_dir: Path, made: Invocation, not_before: float | None = None) -> time_to_accuracy.Record:
    """The ledger record of a finished run: its figures from its own metrics.json, history.jsonl
    and config.yaml; ``not_before`` (epoch seconds): its metrics.json must be newer (this run's)."""
    run = RunDir(run_dir)
    if not run.summary_file.is_file():
        raise Refused(f"{run.summary_file} not found: no finished run in {run.path} (did it fail or stop early?). "
                      "Nothing recorded; look at the run's log, fix it and run the command again")
    try:
        summary = run.summary()
        epochs = run.epochs()
        saved = run.config()
    except BadInput as e:
        raise Refused(f"{e}. Nothing recorded") from None
    mtime = run.summary_file.stat().st_mtime
    if not_before is not None and mtime < not_before:
        raise Refused(f"{run.summary_file} was written before this command started: it is an earlier run's, not "
                      "this one's. Nothing recorded; run again with a new train.output_dir")
    cores = os.cpu_count() or 1
    weakest = sorted(summary.test_per_class_accuracy.items(), key=lambda kv: kv[1])[:2]
    cpu = made.cpu_seconds
    return time_to_accuracy.Record(
        label=made.label, command=relative(made.command), config=relative(made.config),
        overrides=[relative(o) for o in made.overrides], run_dir=relative(str(run.path)),
        wall_seconds=made.wall_seconds, wall_measured_by=made.wall_measured_by, cpu_count=cores,
        load_average_before=made.load_average_before, cpu_seconds=cpu,
        cpu_share=None if cpu is None else cpu / (made.wall_seconds * cores),
        test_accuracy=summary.test_accuracy, test_accuracy_tta=summary.test_accuracy_tta,
        test_samples=summary.test_samples, weakest=[[name, accuracy] for name, accuracy in weakest],
        model=saved.model.name, train_images_per_second=summary.train_images_per_second,
        epochs=[{"epoch": e.epoch, "val_accuracy": e.val_accuracy, "val_accuracy_ema": e.val_accuracy_ema,
                 "epoch_seconds": e.epoch_seconds} for e in epochs],
        store_existed_at_launch=made.store_existed_at_launch, commit=made.commit, dirty=made.dirty,
        finished=datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"))


def check_label(label: str) -> None:
    if label.startswith("lever:") and time_to_accuracy.LEVER.fullmatch(label) is None:
        raise Refused(f"--label {label!r}: a lever's label is lever:<name>:on or lever:<name>:off (no spaces or "
                      "colons in the name); fix the label")


def _config_path(config: str, cwd: Path) -> Path:
    path = Path(config)
    return path if path.is_absolute() else cwd / path


def measure(config: str, root: str | None, overrides: list[str], label: str) -> time_to_accuracy.Record:
    """Run the job's command once, timed, and read back what it reached."""
    check_label(label)
    config_file = Path(config).resolve() if Path(config).is_file() else _config_path(config, REPO)
    words = ["data.source=folder", f"data.root={Path(root).resolve()}"] if root is not None else []
    words += overrides
    cfg = resolve(config_file, words)
    out = _config_path(cfg.train.output_dir, REPO)
    if RunDir(out).is_ours() and cfg.train.resume != "never":
        raise Refused(f"{out} holds an earlier run: the job would resume it, and the wall time would not be the "
                      "whole command's. Move it away, or add train.output_dir=NEW (or train.resume=never, which "
                      "removes that run's outputs)")
    store = _config_path(cfg.data.prepared_dir, REPO) / cfg.data.source
    store_existed = (store / "meta.json").is_file()
    argv = [sys.executable, ENTRY, "--config", str(config_file), *words]
    command = "python " + relative(shlex.join(argv[1:]))
    commit, dirty = git_state(REPO)
    log = log_beside(out)
    print(f"[{label}] {command}\n[{label}] output also in {log}", flush=True)
    if store_existed:
        print(f"[{label}] note: the prepared store {store} exists, so this command will not prepare the data "
              "(recorded as store_existed_at_launch)", flush=True)
    launched = launch(argv, log)
    if launched.returncode != 0:
        raise Refused(f"the run exited {launched.returncode} (log: {log}). Nothing recorded; fix what the log says "
                      "and run again")
    made = Invocation(label, command, str(config_file), words, launched.wall_seconds, "bench/cpu_hour.py",
                      launched.cpu_seconds, launched.load_average_before, store_existed, commit, dirty)
    return record_of(out, made, not_before=time.time() - launched.wall_seconds - 1)


def parse_command(command: str) -> tuple[str, list[str]]:
    """The --config and the section.key=value words of a job/train.py command line."""
    words = shlex.split(command.replace("\\\n", " "))
    entry = next((i for i, w in enumerate(words) if w.endswith(ENTRY)), None)
    if entry is None:
        raise Refused(f"--command {command[:120]!r} does not run {ENTRY}; give the command the run was made with")
    config, overrides, rest = None, [], iter(words[entry + 1:])
    for word in rest:
        if word == "--config":
            config = next(rest, None)
        elif word.startswith("--config="):
            config = word.partition("=")[2]
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
        else:
            raise Refused(f"--command: {word!r} is neither --config nor section.key=value; give the command the "
                          "run was made with")
    if config is None:
        raise Refused("--command has no --config; give the command the run was made with")
    return config, overrides


def wall_from_log(log: Path) -> float:
    """The last ``WALL_SECONDS <s> rc=<n>`` line of a wrapper's log; a failed run is refused."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = WALL_LINE.findall(text)
    if not found:
        raise Refused(f"{log}: no 'WALL_SECONDS <seconds>' line: has the run ended? Wait for it, or give "
                      "--wall-seconds")
    seconds, rc = found[-1]
    if rc and int(rc) != 0:
        raise Refused(f"{log}: the run exited {rc}; a failed run is not recorded. Fix it and run again")
    return float(seconds)


def record_existing(run_dir: Path, command: str, label: str, cwd: Path, wall_seconds: float | None,
                    wall_log: Path | None) -> time_to_accuracy.Record:
    """The record of a run made outside this script with ``command`` (run in ``cwd``)."""
    check_label(label)
    if (wall_seconds is None) == (wall_log is None):
        raise Refused("--record-existing needs its wall time: --wall-log LOG (its WALL_SECONDS line) or "
                      "--wall-seconds S, one of them")
    if wall_log is not None:
        wall_seconds = wall_from_log(wall_log)
        measured_by = f"the WALL_SECONDS line of {relative(str(wall_log.resolve()))}"
    else:
        measured_by = "given with --wall-seconds (measured outside bench/cpu_hour.py)"
    if wall_seconds <= 0:
        raise Refused(f"wall time {wall_seconds} s: not a time a run takes; give the measured one")
    config, overrides = parse_command(command)
    run = RunDir(run_dir.resolve())
    if not run.config_file.is_file():
        raise Refused(f"{run.config_file} not found: is {run_dir} the train.output_dir of a run of this job?")
    expected = resolve(_config_path(config, cwd), overrides, cwd)
    try:
        saved = run.config()
        resumed = run.resumes()
    except BadInput as e:
        raise Refused(f"{e}. Nothing recorded") from None
    if resumed:
        raise Refused(f"{run.resumes_file}: the run was resumed, so no one command's wall time covers it; record a "
                      "run made in one go")
    differ = _differences(expected, saved)
    if differ:
        raise Refused(f"--command does not resolve to the config the run in {run.path} saved ({'; '.join(differ[:5])}"
                      f"{'; ...' if len(differ) > 5 else ''}): give the command it was made with, and --cwd the "
                      "checkout it ran in")
    commit, _ = git_state(cwd)  # the checkout's HEAD now; whether it had local changes then is not known
    spelled = " ".join(command.replace("\\\n", " ").split())
    return record_of(run.path, Invocation(label, spelled, config, overrides, wall_seconds, measured_by, commit=commit))


def _differences(expected: Config, saved: Config) -> list[str]:
    want, have = _flat(dataclasses.asdict(expected)), _flat(dataclasses.asdict(saved))
    return [f"{key}: run {have.get(key)!r}, command {want.get(key)!r}" for key in sorted(want.keys() | have.keys())
            if want.get(key) != have.get(key)]


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=time_to_accuracy.PRESET, help="the preset (default: %(default)s)")
    p.add_argument("--root", help="CIFAR-10 as image folders (DIR/train/<class>, DIR/test/<class>): adds "
                                  "data.source=folder data.root=DIR")
    p.add_argument("--label", help="the record's label (default: the preset's file name, e.g. cpu_hour); "
                                   "lever:<name>:on / lever:<name>:off for a lever pair")
    p.add_argument("--record-existing", type=Path, metavar="RUN_DIR",
                   help="record a run made outside this script (with --command and --wall-log or --wall-seconds)")
    p.add_argument("--command", help="--record-existing: the command the run was made with")
    p.add_argument("--cwd", type=Path, default=REPO, help="--record-existing: where that command ran (its "
                                                          "--config is read there; default: this checkout)")
    p.add_argument("--wall-log", type=Path, help="--record-existing: the log with the run's 'WALL_SECONDS <s>' line")
    p.add_argument("--wall-seconds", type=float, help="--record-existing: the run's wall time, measured outside")
    p.add_argument("overrides", nargs="*", help="section.key=value words for the job (after --)")
    args = p.parse_args(argv)
    try:
        if args.record_existing is not None:
            if args.command is None or args.overrides or args.root:
                raise Refused("--record-existing takes the whole command as --command \"...\" (no --root or "
                              "overrides of its own)")
            label = args.label or Path(parse_command(args.command)[0]).stem  # the preset it ran
            record = record_existing(args.record_existing, args.command, label, args.cwd.resolve(),
                                     args.wall_seconds, args.wall_log)
        else:
            record = measure(args.config, args.root, args.overrides, args.label or Path(args.config).stem)
    except Refused as e:
        print(f"bench/cpu_hour.py: refused: {e}", file=sys.stderr)
        return 2
    ledger = time_to_accuracy.append(record, time_to_accuracy.LEDGER)
    tta = "" if record.test_accuracy_tta is None else f", flip-TTA {record.test_accuracy_tta:.4f}"
    share = "not measured" if record.cpu_share is None else f"{record.cpu_share:.2f}"
    print(f"[{record.label}] test {record.test_accuracy:.4f}{tta}, wall {record.wall_minutes:.1f} min, CPU share "
          f"{share}: recorded in {ledger}; `make results-doc` rewrites the plot and docs/RESULTS.md's section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
