"""Where the job writes, checked before any expensive work: a directory it cannot write (a
read-only mount, a network volume owned by root) is refused at start-up, not after an hour of
feature extraction or the first epoch."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from job.atomic import foreign
from job.config import Config, ConfigError
from job.run_dir import RunDir

# Network file systems ignore the pod's fsGroup, so a volume owned by root stays unwritable for
# the job's non-root user: what to change, per provider (docs/KUBERNETES.md, "Volumes").
OWNERSHIP_FIX = ("On Kubernetes: mount a writable volume there (the runs volume), or make the volume writable for "
                 "the pod's user (uid 1000, gid 1000): fsGroup is not applied to NFS-type volumes (Filestore, EFS, "
                 "Azure Files, CephFS); set the EFS access point's posixUser/rootDirectory uid and gid to 1000, "
                 "csi-driver-nfs's mountPermissions (e.g. \"0777\") or the export's ownership, and see "
                 "docs/KUBERNETES.md (Volumes)")


def feature_cache_root(cfg: Config) -> Path:
    """``features.cache_dir``, by default beside the prepared store."""
    return Path(cfg.features.cache_dir or Path(cfg.data.prepared_dir) / "features")


def directories_written(cfg: Config, *, cached: bool) -> dict[str, Path]:
    """The config key and directory of everything this run will write."""
    written = {"train.output_dir": Path(cfg.train.output_dir)}
    if cached:
        written["features.cache_dir"] = feature_cache_root(cfg)
    store = Path(cfg.data.prepared_dir) / cfg.data.source
    if not (store / "meta.json").is_file():  # a prepared store is read, not written
        written["data.prepared_dir"] = store
    return written


def check_output_dir(out: Path) -> None:
    """Refuse an unusable output directory before any data or model is built (and create nothing:
    a refused run leaves no trace)."""
    existing = _nearest_existing(out)
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == out else f"is inside {existing}, which is a file"
        raise ConfigError(f"train.output_dir={out} {what}; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir={out}: {existing} is not writable; choose a writable path")
    run = RunDir(out)
    best = run.best
    if foreign(best, is_ours=RunDir.is_best) is not None:  # what save_best would refuse to replace
        raise ConfigError(f"{best} exists and was not written by this job (no model.json); it would be replaced "
                          "by the best model: choose another train.output_dir")
    if out.is_dir() and any(out.iterdir()) and not run.is_ours():
        raise ConfigError(f"train.output_dir={out} is a non-empty folder that no run of this job wrote (no "
                          "config.yaml of ours): its config.yaml, history.jsonl, best/ would be overwritten. "
                          "Nothing was written; choose a new or empty train.output_dir")


def check_writable(cfg: Config, *, cached: bool) -> None:
    """Refuse (ConfigError: exit 2) when a directory this run will write cannot be written.

    Probed by creating (and removing) a file in the directory, or in its nearest existing
    parent when it does not exist yet: ``os.access`` cannot see a read-only mount's or an NFS
    server's refusal reliably. Nothing is left behind."""
    for key, path in directories_written(cfg, cached=cached).items():
        existing = _nearest_existing(path)
        if not existing.is_dir():
            continue  # check_output_dir and the data preparation say what is wrong with those
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        except OSError as e:
            why = "a read-only file system" if e.errno == errno.EROFS else (e.strerror or type(e).__name__)
            raise ConfigError(f"{key}={path}: {existing} is not writable by uid {os.getuid()} gid {os.getgid()} "
                              f"({why}), and this run writes there. Point {key} at a writable directory. "
                              f"{OWNERSHIP_FIX}") from None
        os.close(fd)
        os.unlink(probe)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (the root, at worst): where a write would land."""
    return next(p for p in (path, *path.parents) if p.exists())
