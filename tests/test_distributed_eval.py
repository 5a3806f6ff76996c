"""Exact evaluation counts under 2 real processes (accelerate launch, gloo on CPU)."""
import json

import pytest

from helpers.runs import accelerate_launch, run


@pytest.mark.slow
def test_eval_counts_are_exact_across_two_processes(tmp_path):
    """1001 samples in batches of 64 (uneven chunks), and 3 samples for 2 ranks in batches of 4."""
    out = tmp_path / "result.json"
    run(accelerate_launch(2, "tests/helpers/eval_counts.py", str(out), "1001:64", "3:4"))
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    for spec, got in result["cases"].items():
        n = int(spec.split(":")[0])
        assert sorted(got["seen"]) == list(range(n)), f"{spec}: every sample exactly once"
        assert got["samples"] == got["tta_samples"] == n
        assert got["accuracy"] == pytest.approx(((n + 1) // 2) / n)
        # the images are uniform, so their mirrors are too: test-time flips change no prediction
        assert got["tta_accuracy"] == got["accuracy"]
