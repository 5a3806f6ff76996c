"""Every `make` target README.md and docs/*.md name exists and runs in its dry form (`make -n`);
`make demo-synthetic` runs for real, tiny; the bench scripts' --help descriptions are whole."""
from __future__ import annotations

import ast
import re
import subprocess

import pytest
import yaml

from helpers.runs import REPO, run
from job.run_dir import RunDir

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `make -o STAMP`: the venv counts as installed (the suite runs from it), so nothing is reinstalled.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]


def code_of(text: str) -> list[str]:
    """The code in a page: inline code spans and the lines of fenced blocks."""
    code, fenced = [], False
    for line in text.splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            fenced = not fenced
            continue
        code += [line] if fenced else re.findall(r"`([^`]+)`", line)
    return code


def named_targets() -> set[str]:
    targets = set()
    for page in PAGES:
        for snippet in code_of(page.read_text()):
            targets.update(re.findall(r"(?:^|[;&|(]\s*|\s)make ([a-z][a-z0-9-]*)", " " + snippet))
    return targets


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.M))


def test_the_docs_name_the_targets_we_expect_and_each_exists():
    named = named_targets()
    assert {"demo", "demo-synthetic", "test", "install", "bench", "results", "recipe", "lock"} <= named, named
    assert named <= makefile_targets(), named - makefile_targets()


@pytest.mark.parametrize("target", sorted(named_targets()))
def test_every_named_target_runs_dry(target):
    proc = subprocess.run([*MAKE, "-n", target], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), f"make -n {target} would do nothing"


def test_demo_synthetic_trains_for_real_on_generated_data(tmp_path):
    """DATA.md points to it: the demo config's data.root (the sample tarball) must not leak into a
    synthetic run. Tiny through OVERRIDES; the recipe's own keys as the Makefile spells them."""
    out = tmp_path / "demo-synthetic"
    overrides = (f"train.epochs=1 data.synthetic_train=200 data.synthetic_test=50 train.output_dir={out} "
                 f"data.prepared_dir={tmp_path / 'prep'} tracking.wandb=disabled data.num_threads=1")
    run([*MAKE, "demo-synthetic", f"OVERRIDES={overrides}"], timeout=600)
    summary = RunDir(out).summary()
    assert summary.test_samples == 50 and summary.epochs_completed == 1
    saved = yaml.safe_load(RunDir(out).config_file.read_text().split("\n", 1)[1])
    assert saved["data"]["source"] == "synthetic" and saved["data"]["root"] is None
    assert saved["model"]["name"] == "resnet10t" and saved["model"]["pretrained"] is False


def test_make_demo_runs_the_readme_commands():
    proc = subprocess.run([*MAKE, "-n", "-W", "data/weights/tf_efficientnet_lite0.safetensors", "demo"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "job/train.py --config job/configs/demo.yaml train.resume=never" in proc.stdout
    assert "train.output_dir=runs/demo-random" in proc.stdout and "job.reporting compare" in proc.stdout




@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")))
def test_bench_help_descriptions_are_whole_sentences(script):
    """What --help shows of the docstring (its first paragraph, or its first line) ends a sentence."""
    source = (REPO / "bench" / script).read_text()
    match = re.search(r"description=__doc__(\.split\(\"((?:\\n)+)\"\)\[0\])?", source)
    if "ArgumentParser(" not in source or match is None:
        pytest.skip("no --help description from the docstring")
    if not match.group(1):
        return  # the whole docstring: nothing cut
    doc = ast.get_docstring(ast.parse(source), clean=False).strip()
    shown = doc.split(match.group(2).replace("\\n", "\n"))[0]
    assert shown.strip().endswith((".", ")", ":", "?")), shown[-80:]


def test_the_readme_submit_example_renders(tmp_path):
    """README's k8s/submit.sh line, as written (DIGEST filled in), renders with --dry-run: exit 0."""
    text = (REPO / "README.md").read_text()
    (example,) = re.findall(r"`(k8s/submit\.sh\s[^`]*)`", text)
    args = example.replace("DIGEST", "a" * 64).split()
    assert "--name" in args and "--nodes" in args
    proc = subprocess.run(["bash", *args, "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kind: JobSet" in proc.stdout and "irv2-ft4" in proc.stdout
