"""Collective timeouts on torch older than 2.14 (job/distributed.py: set_group_timeout): the
public ``torch.distributed.set_timeout`` (and ``ProcessGroup.set_timeout``) appeared in 2.14,
while pyproject allows torch>=2.5. Two real training processes run with both removed."""
from __future__ import annotations

import pytest
from helpers.runs import accelerate_launch, run, small_run

from job.run_dir import RunDir

# Imported first by every Python process of the run (PYTHONPATH): torch as 2.5 to 2.13 ship it.
_WITHOUT_SET_TIMEOUT = '''
import torch.distributed
import torch._C._distributed_c10d as c10d

del torch.distributed.set_timeout
delattr(c10d.ProcessGroup, "set_timeout")
'''


@pytest.mark.slow
def test_two_processes_train_past_the_first_update_without_set_timeout(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_WITHOUT_SET_TIMEOUT)
    out = tmp_path / "run"
    args = small_run(out, tmp_path / "prep", "train.epochs=1", "timeouts.step_minutes=0.5",
                     "timeouts.setup_minutes=2")
    proc = run(accelerate_launch(2, "job/train.py", *args), env={"PYTHONPATH": str(shim)}, timeout=400)
    # the timeout really changed: 2 min during setup, 30 s from the first update on
    assert "collective timeout now 0:00:30 (timeouts.step_minutes)" in proc.stdout
    assert "AttributeError" not in proc.stdout + proc.stderr
    summary = RunDir(out).summary()
    assert summary.world_size == 2 and summary.epochs_completed == 1 and summary.replicas_identical is True


def test_the_shim_really_removes_set_timeout(tmp_path):
    """Without this the test above could pass on the public API it means to take away."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_WITHOUT_SET_TIMEOUT)
    probe = "import torch.distributed as d, torch._C._distributed_c10d as c; " \
            "print(hasattr(d, 'set_timeout'), hasattr(c.ProcessGroup, 'set_timeout'))"
    from helpers.runs import PYTHON

    proc = run([PYTHON, "-c", probe], env={"PYTHONPATH": str(shim)})
    assert proc.stdout.split() == ["False", "False"]
