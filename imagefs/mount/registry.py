"""Mount records: RUN_DIR/mounts/<key>.json says which image and index are served where, by
which pid, and where the log is.

A record is written by rename once the mount is ready and removed when its process ends;
the kernel's mount table stays the truth, so a record whose mount is gone is dropped when
mounts are listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass

from imagefs.places import run_dir

from .kernel import FSTYPE, canonical, kernel_mounts, pid_alive


def records_dir() -> str:
    d = os.path.join(run_dir(), "mounts")
    os.makedirs(d, mode=0o755, exist_ok=True)
    return d


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


def log_path(mountpoint: str) -> str:
    """Where the mount process at mountpoint (canonical) writes its log."""
    return os.path.join(records_dir(), _key(mountpoint) + ".log")


@dataclass
class MountRecord:
    image: str
    index: int
    name: str
    mountpoint: str
    pid: int
    mode: str = "ro"
    started: str = ""
    log: str = ""
    state: str = "mounted"  # mounted; dead (process gone, mount left); unregistered;
    # writable mounts: live, or stale (the process is gone; `imagefs remount` it)
    session: str = ""
    staged_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def record_path(self) -> str:
        return os.path.join(records_dir(), _key(self.mountpoint) + ".json")

    def save(self) -> None:
        tmp = f"{self.record_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.to_json(), fh)
        os.replace(tmp, self.record_path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)


def _load_record(path: str) -> MountRecord | None:
    try:
        with open(path) as fh:
            doc = json.load(fh)
        return MountRecord(**{k: v for k, v in doc.items()
                              if k in MountRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def record_for(mountpoint: str) -> MountRecord | None:
    return _load_record(os.path.join(records_dir(), _key(canonical(mountpoint)) + ".json"))


def list_records() -> list[MountRecord]:
    """Every imagefs mount the kernel shows: the recorded ones (records of vanished mounts
    are dropped) and any other fuse.imagefs mount, as unregistered."""
    mounted = {m.mountpoint: m for m in kernel_mounts() if m.fstype == FSTYPE}
    out = []
    d = records_dir()
    for fname in sorted(os.listdir(d)):
        if not fname.endswith(".json"):
            continue
        rec = _load_record(os.path.join(d, fname))
        if rec is None:
            continue
        alive = pid_alive(rec.pid)
        if rec.mountpoint not in mounted:
            if not alive:
                rec.remove()
            continue
        rec.state = "mounted" if alive else "dead"
        out.append(rec)
        del mounted[rec.mountpoint]
    for m in mounted.values():
        out.append(MountRecord(image=m.source, index=0, name="", mountpoint=m.mountpoint,
                               pid=0, state="unregistered"))
    return out
