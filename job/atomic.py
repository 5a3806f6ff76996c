"""Directories that appear complete or not at all, and that replace only what the job wrote."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator


class ForeignDirectoryError(FileExistsError):
    """The target exists and is not something this job wrote: it is never replaced."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


@contextlib.contextmanager
def atomic_directory(final: Path, *, is_ours: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a sibling temporary directory to fill; on success it replaces ``final``, on any
    error it is removed and ``final`` is left untouched.

    ``final`` is replaced only when it is missing, an empty directory, or a directory that
    ``is_ours`` recognises as written by this job (a store's ``meta.json``, ``best/model.json``):
    a mistyped path never deletes a user's files. Temporary directories left by a process that
    was killed (SIGKILL, or SIGTERM before its handler was installed) are removed on the next
    call (``remove_abandoned``).
    """
    final = Path(final)
    why = foreign(final, is_ours)
    if why is not None:
        raise ForeignDirectoryError(final, why)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    old = final.parent / f".{final.name}.old-{tag}"
    if _is_our_temporary(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _mark(tmp)
    try:
        yield tmp
        if _is_our_temporary(old):
            shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            _mark(final)  # what is renamed aside carries the marker, so a killed run's .old- is cleaned up too
            final.rename(old)
        tmp.rename(final)
        _unmark(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def foreign(final: Path, is_ours: Callable[[Path], bool]) -> str | None:
    """Why ``final`` must not be replaced (it is something this job did not write), or None: the
    rule of ``atomic_directory``, for checks made before the write (job/storage.py)."""
    if final.is_symlink() or final.exists() and not final.is_dir():
        return "exists and is not a directory"
    if final.is_dir() and any(final.iterdir()) and not is_ours(final):
        return "is a non-empty directory that this job did not write"
    return None


# Another host's temporary (shared storage; a rescheduled pod gets a new hostname) is removed once
# nothing in it has changed for this long: its PID cannot be checked from here.
ABANDONED_AFTER_SECONDS = 24 * 3600


def remove_abandoned(final: Path) -> None:
    """Clean up after killed processes: remove their ``.NAME.tmp-HOST-PID``, and their
    ``.NAME.old-HOST-PID`` (or put it back, if ``final`` is missing). A temporary of this host
    is abandoned when its process is dead; another host's, when nothing in it changed for
    ABANDONED_AFTER_SECONDS. Only directories that carry TEMPORARY_MARKER are touched: a user's
    folder that merely looks like one (``.store.tmp-laptop-4242``) is never ours to delete.
    Called before every write and by every run that reuses ``final``."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            tag_host, _, pid = path.name[len(f".{final.name}.{kind}-"):].rpartition("-")
            if not pid.isdigit() or not _is_our_temporary(path) or not _abandoned(path, tag_host == host, int(pid)):
                continue
            try:
                if kind == "old" and not final.exists():
                    path.rename(final)  # killed between the two renames: the old version is the good one
                    _unmark(final)
                else:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:  # another process got there first
                pass


# Written into every temporary (and into a version before it is renamed aside): cleanup matches
# this file, never a name alone.
TEMPORARY_MARKER = ".cifar-transfer-temporary"


def _mark(directory: Path) -> None:
    (directory / TEMPORARY_MARKER).write_text("a temporary of cifar-transfer's job/atomic.py: removed when abandoned\n")


def _unmark(directory: Path) -> None:
    (directory / TEMPORARY_MARKER).unlink(missing_ok=True)


def _is_our_temporary(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / TEMPORARY_MARKER).is_file()


def _abandoned(path: Path, same_host: bool, pid: int) -> bool:
    if same_host:
        return not _alive(pid)
    try:
        # ctime too: a rename (how .old- directories are made) keeps mtimes but updates the ctime
        newest = max((max(st.st_mtime, st.st_ctime) for st in (p.lstat() for p in (path, *path.rglob("*")))),
                     default=0.0)
    except OSError:  # being removed by its owner right now
        return False
    return time.time() - newest > ABANDONED_AFTER_SECONDS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
