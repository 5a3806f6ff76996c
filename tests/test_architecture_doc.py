"""docs/ARCHITECTURE.md names functions in order; each must exist where it says, so the tour
cannot drift from the code."""
import importlib
import re

from helpers.runs import REPO


def test_every_name_in_the_guided_tour_exists():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    module = None
    checked = 0
    for token in re.findall(r"`([^`]+)`", text):
        qualified = re.fullmatch(r"([\w/]+)\.py: ([\w.]+)", token)
        if qualified:
            module = importlib.import_module(qualified.group(1).replace("/", "."))
            token = qualified.group(2)
        elif module is None or not (re.fullmatch(r"[A-Z]\w*(\.\w+)?", token)
                                    or re.fullmatch(r"[a-z_]+_[a-z_]+", token)):
            continue  # config keys, file names and library calls (fn.resize) are not ours to check
        found = _find(token, module)
        assert found, f"{token} (after {module.__name__}) is not in the code"
        checked += 1
    assert checked >= 40


def _find(name: str, near) -> bool:
    """In the last named module, or in any module of the job that the tour walks through."""
    for where in (near.__name__, "job.train", "job.modes", "job.loop", "job.checkpoint", "job.optim",
                  "job.early_stopping", "job.preemption", "job.tracking", "job.distributed", "job.features",
                  "dali_pipelines.sampling", "dali_pipelines.loader", "dali_pipelines.spec",
                  "dali_pipelines.torch_loader", "job.data.store",
                  "job.records", "job.run_dir", "job.config"):
        obj = importlib.import_module(where)
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return True
    return False


def test_the_component_table_is_build_components():
    """docs/ARCHITECTURE.md's component table names each component that job/train.py:
    build_components registers, with its file and its registration line, in order."""
    import inspect

    from job.components import Component
    from job.train import build_components

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("<!-- components:start -->")[1].split("<!-- components:end -->")[0]
    rows = [re.findall(r"`([^`]+)`", line) for line in table.splitlines() if line.startswith("| `")]
    source = inspect.getsource(build_components)
    body = source.split("components = [")[1].split("]")[0]
    registered = [line.split("  #")[0].strip().rstrip(",") for line in body.splitlines() if line.strip()]
    assert [row[3] for row in rows] == registered  # component, file, section, registration line
    for name, path, *_ in rows:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        cls = getattr(module, name)
        assert issubclass(cls, Component), name
