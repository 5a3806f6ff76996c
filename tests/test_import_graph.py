"""The modules of job/ and dali_pipelines/ import each other without a circle (every import
counts, those inside functions too): each can be read, tested and replaced from the bottom up."""
from __future__ import annotations

import ast

from helpers.runs import REPO

PACKAGES = ("job", "dali_pipelines")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = (path.name == "__init__.py", ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (``from package import module`` is the module)."""
    modules = _modules()
    graph = {}
    for name, (is_package, tree) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of ``graph`` as a path that returns to its start (one per strongly connected part)."""
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_the_checker_finds_a_circle_and_reads_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "job.run_dir" in graph["job.storage"] and "dali_pipelines.source" in graph["dali_pipelines.loader"]
    assert "job.model" in graph["job.card"]  # an import inside a function counts
    assert len(graph) >= 40


def test_job_and_dali_pipelines_have_no_import_circle():
    assert cycles(import_graph()) == []
