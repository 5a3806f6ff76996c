"""Where the job writes, checked before any expensive work: a directory it cannot write (a
read-only mount, a network volume owned by root) is refused at start-up, not after an hour of
feature extraction or the first epoch."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from job.config import Config, ConfigError

# Network file systems ignore the pod's fsGroup, so a volume owned by root stays unwritable for
# the job's non-root user: what to change, per provider (docs/KUBERNETES.md, "Volumes").
OWNERSHIP_FIX = ("On Kubernetes: mount a writable volume there (the runs volume), or make the volume writable for "
                 "the pod's user (uid 1000, gid 1000): fsGroup is not applied to NFS-type volumes (Filestore, EFS, "
                 "Azure Files, CephFS); set the EFS access point's posixUser/rootDirectory uid and gid to 1000, "
                 "csi-driver-nfs's mountPermissions (e.g. \"0777\") or the export's ownership, and see "
                 "docs/KUBERNETES.md (Volumes)")


def feature_cache_root(cfg: Config) -> Path:
    """``train.feature_cache_dir``, by default beside the prepared store."""
    return Path(cfg.train.feature_cache_dir or Path(cfg.data.prepared_dir) / "features")


def directories_written(cfg: Config, *, cached: bool) -> dict[str, Path]:
    """The config key and directory of everything this run will write."""
    written = {"train.output_dir": Path(cfg.train.output_dir)}
    if cached:
        written["train.feature_cache_dir"] = feature_cache_root(cfg)
    store = Path(cfg.data.prepared_dir) / cfg.data.source
    if not (store / "meta.json").is_file():  # a prepared store is read, not written
        written["data.prepared_dir"] = store
    return written


def check_writable(cfg: Config, *, cached: bool) -> None:
    """Refuse (ConfigError: exit 2) when a directory this run will write cannot be written.

    Probed by creating (and removing) a file in the directory, or in its nearest existing
    parent when it does not exist yet: ``os.access`` cannot see a read-only mount's or an NFS
    server's refusal reliably. Nothing is left behind."""
    for key, path in directories_written(cfg, cached=cached).items():
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
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
