"""Exact evaluation counts under 2 real processes (accelerate launch, gloo on CPU)."""
import json

import pytest

from helpers.runs import accelerate_launch, run


@pytest.mark.slow
@pytest.mark.parametrize("n,batch", [(1001, 64), (3, 4)])
def test_eval_counts_are_exact_across_two_processes(tmp_path, n, batch):
    out = tmp_path / "result.json"
    run(accelerate_launch(2, "tests/helpers/eval_counts.py", str(n), str(batch), str(out)))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert sorted(result["seen"]) == list(range(n)), "every sample exactly once"
    assert result["samples"] == n
    assert result["accuracy"] == pytest.approx(((n + 1) // 2) / n)
