"""The time-to-accuracy ledger, docs/results/time_to_accuracy.jsonl: one JSON line per run of the
job that bench/cpu_hour.py timed (the whole command, launch to exit, data preparation included),
its figures read from the run's own files; and what is drawn from it: test accuracy against wall
time with its Pareto front (docs/results/time_to_accuracy.svg), the one-hour preset's best
record, the lever on/off pairs, and docs/RESULTS.md's section between its markers. Nothing here
runs a job: bench/results.py (`make results`, `make results-doc`) writes the plot and the section.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO

# The one place the ledger and its figure are named: cpu_hour.py appends, results.py reads.
LEDGER = REPO / "docs" / "results" / "time_to_accuracy.jsonl"
FIGURE = LEDGER.with_suffix(".svg")
START, END = "<!-- time-to-accuracy:start -->", "<!-- time-to-accuracy:end -->"

# Issue #30's target: this test accuracy on all 10,000 CIFAR-10 test images within this much wall
# time of the whole command on the 2-core development machine.
TARGET_ACCURACY = 0.93
TARGET_SECONDS = 3600.0
HEADLINE = "cpu_hour"  # the label of the one-hour preset's records (bench/cpu_hour.py's default)
PRESET = "job/configs/cpu_hour.yaml"
LEVER = re.compile(r"lever:(?P<name>[^:\s]+):(?P<side>on|off)")


class LedgerError(ValueError):
    """A ledger line that is not a record of bench/cpu_hour.py: names the file and the line."""


@dataclass
class Record:
    """One timed run: how it was run and what its own files say it reached."""
    label: str  # "cpu_hour", "lever:<name>:on" / "lever:<name>:off", or any name
    command: str  # the whole command, as a checkout runs it from the repository root
    config: str  # its --config
    overrides: list[str]  # its section.key=value words
    run_dir: str  # the run's train.output_dir (repository-relative when inside it)
    wall_seconds: float  # launch to exit: start-up, data preparation, training, test
    wall_measured_by: str  # "bench/cpu_hour.py", or where a run made outside it logged its time
    cpu_count: int  # os.cpu_count() of the machine
    load_average_before: float | None  # 1-minute load average just before launch (None: not seen)
    cpu_seconds: float | None  # user + system CPU seconds of the command and its children
    cpu_share: float | None  # cpu_seconds / (wall_seconds x cpu_count): near 1 = had the cores to itself
    test_accuracy: float  # metrics.json: the best weights on the test split
    test_accuracy_tta: float | None  # metrics.json: with test-time flips (tta.test=flip), else None
    test_samples: int
    weakest: list[list]  # the two weakest test classes, [name, accuracy]
    model: str  # the run's model.name
    train_images_per_second: float
    epochs: list[dict]  # history.jsonl: epoch (0-based), val_accuracy, val_accuracy_ema, epoch_seconds
    store_existed_at_launch: bool | None  # True: data preparation was skipped (None: not known)
    commit: str | None  # git HEAD of the checkout that ran it
    dirty: bool | None  # tracked files changed in that checkout when it ran (None: not known)
    finished: str  # metrics.json's modification time, UTC, ISO 8601

    @property
    def wall_minutes(self) -> float:
        return self.wall_seconds / 60

    def on_target(self) -> bool:
        return self.test_accuracy >= TARGET_ACCURACY and self.wall_seconds <= TARGET_SECONDS


def read_ledger(path: Path | None = None) -> list[Record]:
    """Every record, in the order they were appended ([] when there is no ledger yet)."""
    path = LEDGER if path is None else path
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(**json.loads(line)))
        except (ValueError, TypeError) as e:  # not JSON, not a mapping, missing or unknown fields
            raise LedgerError(f"{path}: line {number} is not a record of bench/cpu_hour.py ({str(e)[:200]}); "
                              "restore the line from git") from None
    return records


def append(record: Record, path: Path | None = None) -> Path:
    path = LEDGER if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dataclasses.asdict(record)) + "\n")
    return path


def distinct_runs(records: Sequence[Record]) -> list[Record]:
    """One record per run: a run recorded again under another label (``--record-existing`` to make it
    one side of a lever pair) is one point and one row, its labels joined, at its first record's place."""
    merged: dict[tuple[str, str, int, float], Record] = {}
    for r in records:
        key = (r.run_dir, r.finished, round(r.wall_seconds), r.test_accuracy)
        if key in merged:
            first = merged[key]
            labels = first.label.split(", ")
            merged[key] = dataclasses.replace(first, label=", ".join(labels + [r.label] * (r.label not in labels)))
        else:
            merged[key] = r
    return list(merged.values())


# ---------------------------------------------------------------------------------- the math
def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (wall, accuracy) points no other point beats: each is more accurate than every point
    at the same or a smaller wall time, in order of wall time. Read as a step function it is the
    best accuracy reachable within each wall time."""
    front: list[tuple[float, float]] = []
    for wall, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((wall, accuracy))
    return front


def front_records(records: Sequence[Record]) -> list[Record]:
    """The records on the Pareto front of test accuracy against wall time (the first of equals)."""
    front = set(pareto_front([(r.wall_seconds, r.test_accuracy) for r in records]))
    chosen, seen = [], set()
    for r in sorted(records, key=lambda r: r.wall_seconds):
        point = (r.wall_seconds, r.test_accuracy)
        if point in front and point not in seen:
            chosen.append(r)
            seen.add(point)
    return chosen


def best_within(records: Sequence[Record], seconds: float) -> Record | None:
    """The most accurate record whose whole command took at most ``seconds``."""
    inside = [r for r in records if r.wall_seconds <= seconds]
    return max(inside, key=lambda r: r.test_accuracy, default=None)


def headline(records: Sequence[Record]) -> Record | None:
    """The one-hour preset's best record (label HEADLINE) by test accuracy."""
    return max((r for r in records if r.label == HEADLINE), key=lambda r: r.test_accuracy, default=None)


@dataclass(frozen=True)
class LeverPair:
    """One lever measured off and on: the latest record of ``lever:<name>:off`` and of ``:on``."""
    name: str
    off: Record | None
    on: Record | None

    @property
    def difference(self) -> float | None:
        """Test accuracy on minus off (None while one side is missing)."""
        if self.off is None or self.on is None:
            return None
        return self.on.test_accuracy - self.off.test_accuracy


def lever_pairs(records: Sequence[Record]) -> list[LeverPair]:
    """The ``lever:<name>:on`` / ``lever:<name>:off`` records paired by name (a later record of the
    same label replaces an earlier one), sorted by name; a side not yet run is None."""
    sides: dict[str, dict[str, Record]] = {}
    for r in records:
        match = LEVER.fullmatch(r.label)
        if match:
            sides.setdefault(match["name"], {})[match["side"]] = r
    return [LeverPair(name, sides[name].get("off"), sides[name].get("on")) for name in sorted(sides)]


# ---------------------------------------------------------------------------------- the figure
def plot(records: Sequence[Record], path: Path) -> None:
    """Test accuracy against wall minutes, one labelled point per record, the Pareto front as a
    step line with its points ringed, the 0.93 target and the 60-minute line. SVG with its text as
    text and fixed ids (no date, a fixed hash salt): the same ledger writes the same file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"svg.hashsalt": "time-to-accuracy", "svg.fonttype": "none", "font.size": 9}
    with matplotlib.rc_context(style):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for index, r in enumerate(records):
            point = ax.scatter([r.wall_minutes], [r.test_accuracy], s=22, color="tab:blue", zorder=3)
            point.set_gid(f"record-{index}")
            ax.annotate(r.label, (r.wall_minutes, r.test_accuracy), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        front = front_records(records)
        right = 1.08 * max([TARGET_SECONDS / 60, *(r.wall_minutes for r in records)])
        if front:
            xs = [r.wall_minutes for r in front]
            ys = [r.test_accuracy for r in front]
            (step,) = ax.step([*xs, right], [*ys, ys[-1]], where="post", color="tab:orange", zorder=2,
                              label="Pareto front: best accuracy within each wall time")
            step.set_gid("pareto-front")
            marks = ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
            marks.set_gid("pareto-points")
        ax.axhline(TARGET_ACCURACY, color="tab:green", linestyle="--", linewidth=1,
                   label=f"target {TARGET_ACCURACY}").set_gid("target-accuracy")
        ax.axvline(TARGET_SECONDS / 60, color="tab:red", linestyle=":", linewidth=1,
                   label=f"{TARGET_SECONDS / 60:.0f} min").set_gid("target-minutes")
        accuracies = [r.test_accuracy for r in records]
        ax.set_xlim(0, right)
        ax.set_ylim(min([*accuracies, TARGET_ACCURACY]) - 0.02, max([*accuracies, TARGET_ACCURACY]) + 0.01)
        ax.set_xlabel("wall-clock minutes of the whole command (data preparation included), 2 CPU cores")
        ax.set_ylabel("test accuracy (all 10,000 CIFAR-10 test images)")
        ax.set_title(f"CIFAR-10: time to accuracy (every record of {LEDGER.name})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="svg", metadata={"Date": None})
        plt.close(fig)


# ---------------------------------------------------------------------------------- the section
def _tta(r: Record | None) -> str:
    return "-" if r is None or r.test_accuracy_tta is None else f"{r.test_accuracy_tta:.4f}"


def _share(r: Record) -> str:
    if r.cpu_share is None:
        return f"not measured ({r.cpu_count} cores)"
    load = "" if r.load_average_before is None else f", load {r.load_average_before:.2f} before"
    return f"{r.cpu_share:.2f} ({r.cpu_count} cores{load})"


def _prepared(r: Record) -> str:
    return {True: "no (store existed)", False: "yes", None: "not recorded"}[r.store_existed_at_launch]


def _commit(r: Record) -> str:
    if r.commit is None:
        return "commit not recorded"
    return f"commit {r.commit[:10]}" + (" with local changes" if r.dirty else "" if r.dirty is False else "")


def _code(text: str) -> str:
    """``text`` as inline code inside a table cell (a pipe would end the cell)."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _accuracy(r: Record | None) -> str:
    return "not run" if r is None else f"{r.test_accuracy:.4f}"


def _wall(r: Record | None) -> str:
    return "-" if r is None else f"{r.wall_minutes:.1f} min"


def headline_table(records: Sequence[Record]) -> str:
    best = headline(records)
    if best is None:
        return (f"No `{HEADLINE}` record yet: `python bench/cpu_hour.py --root DIR` runs `{PRESET}` and records it.")
    runs = [r for r in records if r.label == HEADLINE]
    spread = "" if len(runs) == 1 else \
        f" (best of {len(runs)} records; test accuracy {min(r.test_accuracy for r in runs):.4f} to " \
        f"{best.test_accuracy:.4f})"
    verdict = "meets" if best.on_target() else "does not meet"
    return (f"The best `{HEADLINE}` record{spread} {verdict} the target (test accuracy ≥ {TARGET_ACCURACY} "
            f"within {TARGET_SECONDS / 60:.0f} min):\n\n"
            "| label | test accuracy | flip-TTA accuracy | wall time | CPU share | data prepared in the run "
            "| command |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
            f"| `{best.label}` | **{best.test_accuracy:.4f}** ({best.test_samples}) | {_tta(best)} | "
            f"{best.wall_minutes:.1f} min | {_share(best)} | {_prepared(best)} | {_code(best.command)} |\n\n"
            f"Its run finished {best.finished} ({_commit(best)}; wall time: {best.wall_measured_by}).")


def ledger_table(records: Sequence[Record]) -> str:
    lines = ["| label | test accuracy | flip-TTA | wall time | CPU share | val accuracy by epoch (epoch s) | "
             "finished (commit: its --config is read there) | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        curve = ", ".join(f"{e['val_accuracy']:.3f} ({e['epoch_seconds']:.0f})" for e in r.epochs) or "-"
        lines.append(f"| `{r.label}` | {r.test_accuracy:.4f} | {_tta(r)} | {r.wall_minutes:.1f} min | {_share(r)} | "
                     f"{curve} | {r.finished[:10]} ({(r.commit or 'not recorded')[:7]}) | {_code(r.command)} |")
    return "\n".join(lines)


def lever_table(pairs: Sequence[LeverPair]) -> str:
    lines = ["| lever | off: test accuracy | on: test accuracy | on − off | off: wall | on: wall "
             "| commands (off; on) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for pair in pairs:
        diff = "-" if pair.difference is None else f"{pair.difference:+.4f}"
        both = "; ".join(_code(r.command) for r in (pair.off, pair.on) if r is not None)
        lines.append(f"| {pair.name} | {_accuracy(pair.off)} | {_accuracy(pair.on)} | {diff} | {_wall(pair.off)} | "
                     f"{_wall(pair.on)} | {both} |")
    return "\n".join(lines)


def section(records: Sequence[Record], figure: str = "results/time_to_accuracy.svg") -> str:
    """docs/RESULTS.md's text between START and END, from the ledger alone (``figure``: the plot's
    link from the page)."""
    if not records:
        return ("No run is recorded yet. `python bench/cpu_hour.py --root DIR` runs the one-hour preset "
                f"(`{PRESET}`) on CIFAR-10 as image folders, times the whole command and appends its record "
                f"to `docs/results/{LEDGER.name}`; `make results-doc` then rewrites this section and its plot.")
    parts = [headline_table(records)]
    pairs = lever_pairs(records)
    records = distinct_runs(records)
    best = best_within(records, TARGET_SECONDS)
    if best is not None:
        parts.append(f"Best within {TARGET_SECONDS / 60:.0f} min, any record: `{best.label}`, "
                     f"{best.test_accuracy:.4f} in {best.wall_minutes:.1f} min.")
    parts.append(f"![test accuracy against wall time, with the Pareto front]({figure})")
    parts.append(f"Every record of `docs/results/{LEDGER.name}`, in the order they were made:\n\n"
                 f"{ledger_table(records)}")
    if pairs:
        parts.append("Levers, each measured off and on (records labelled `lever:<name>:off` and "
                     f"`lever:<name>:on`; the latest of each):\n\n{lever_table(pairs)}")
    else:
        parts.append("No lever pair recorded yet (records labelled `lever:<name>:off` and `lever:<name>:on`).")
    return "\n\n".join(parts)
