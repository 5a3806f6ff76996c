"""Every relative link and #anchor in README.md and docs/*.md resolves: the file exists (relative to
the page, as GitHub resolves it) and the anchor is a heading of that page, slugged as GitHub does."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from helpers.runs import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links there are code)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", lambda m: "`" + " " * (len(m.group(0)) - 2) + "`", line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped (letters,
    digits, spaces, hyphens and underscores kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub gives ``page``: heading slugs (repeats numbered -1, -2, ...) and HTML anchors."""
    seen: Counter = Counter()
    found = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
            seen[slug] += 1
    return found


def links(page: Path) -> list[str]:
    out = []
    for line in prose_lines(page.read_text()):
        out += LINK.findall(line) + IMAGE.findall(line)
    return [t for t in out if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not ours


def test_the_slugs_are_githubs():
    assert github_slug("Data pipeline: DALI vs torchvision `DataLoader` (CPU)") == \
        "data-pipeline-dali-vs-torchvision-dataloader-cpu"
    assert github_slug("`make demo`: real transfer on a laptop CPU") == "make-demo-real-transfer-on-a-laptop-cpu"
    assert github_slug("Resuming and preemption, in detail") == "resuming-and-preemption-in-detail"
    assert github_slug("train_one_epoch / evaluate") == "train_one_epoch--evaluate"


def test_the_link_finder_sees_links_and_skips_code():
    text = "see [a](docs/A.md#x) and `[b](nope.md)` and [c](https://x.org)\n```\n[d](code.md)\n```\n"
    page = REPO / "tests" / ".links-probe.md"
    try:
        page.write_text(text)
        assert links(page) == ["docs/A.md#x"]
    finally:
        page.unlink()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved} "
                          "does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)
