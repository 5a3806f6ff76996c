"""Bounds on untrusted structures: how far a parsed value may expand, and how much of it a message shows.

A few hundred bytes of YAML (anchors) or pickle (memo references) can describe a nested list with
a billion leaves that shares one small object: parsing it is cheap, but whatever walks it next
(our checks, ``np.asarray``, an error message's ``repr``) does a billion steps. ``within_size``
counts the structure as its readers would see it, every shared reference again, and stops at
the limit; ``shown`` cuts a value to a line for an error message.
"""
from __future__ import annotations

import reprlib

import numpy as np


def within_size(value: object, limit: int) -> bool:
    """Whether ``value`` holds at most ``limit`` elements counted as a full walk counts them (a
    repeated reference as often as it appears; a reference cycle never ends, so it is over any
    limit). An ndarray counts as one: its bytes are bounded where it is built."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return False
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)) and not isinstance(item, np.ndarray):
            stack.extend(item)
    return True


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def shown(value: object) -> str:
    """``repr(value)`` cut to about a line: for error messages that quote user input."""
    return _SHORT.repr(value)


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (torch's run to paragraphs) for a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""
