"""Counting the aten operators a piece of code dispatches: the host cost of a step on a GPU that
waits for its launches (tests/test_ema_update.py, tests/test_host_sync.py)."""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """``with AtenOps() as ops: ...`` then ``ops.counts`` (overload packet name -> calls)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
