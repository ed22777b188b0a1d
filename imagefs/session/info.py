"""Sessions as records on disk (STATE_DIR/sessions/ID/session.json): which exist, which is
mounted where, and removing one.  Kept apart from lifecycle.py (opening, committing) so
that finding a session costs a command no import of the image format: `imagefs commit`
only finds its session and asks the mount process to do the work."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from imagefs.errors import NoSuchSession, SessionLive
from imagefs.places import state_dir


def sessions_dir() -> str:
    d = os.path.join(state_dir(), "sessions")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


class SessionInfo:
    """session.json: who opened what, and where it is mounted.

    A plain class, not a dataclass: `imagefs commit` loads this module, and importing
    dataclasses (inspect, ast, dis, tokenize) would be a quarter of the verb's imports."""

    FIELDS = ("id", "image", "uuid", "index", "name", "mountpoint", "pid", "created", "uid",
              "volatile")

    def __init__(self, id: str, image: str, uuid: str, index: int, name: str,
                 mountpoint: str, pid: int, created: str, uid: int,
                 volatile: bool = False) -> None:
        self.id = id
        self.image = image
        self.uuid = uuid
        self.index = index
        self.name = name
        self.mountpoint = mountpoint
        self.pid = pid
        self.created = created
        self.uid = uid
        self.volatile = volatile  # Staging(volatile): a servicing transaction's own session

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SessionInfo) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"SessionInfo({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    @property
    def dir(self) -> str:
        return os.path.join(sessions_dir(), self.id)

    def save(self) -> None:
        path = os.path.join(self.dir, "session.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.as_dict(), fh)
            fh.flush()
            if not self.volatile:
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, session_id: str) -> SessionInfo:
        if not session_id or "/" in session_id or session_id.startswith("."):
            raise NoSuchSession(session_id)
        try:
            with open(os.path.join(sessions_dir(), session_id, "session.json")) as fh:
                doc = json.load(fh)
            return cls(**{k: doc[k] for k in cls.FIELDS
                          if k in doc or k != "volatile"})
        except (OSError, ValueError, KeyError, TypeError):
            raise NoSuchSession(session_id) from None

    def live(self) -> bool:
        from imagefs.mount.kernel import pid_alive

        return bool(self.pid) and pid_alive(self.pid)

    def staged_bytes(self) -> int:
        from .staging import directory_bytes

        return directory_bytes(self.dir)


def list_sessions() -> list[SessionInfo]:
    out = []
    d = sessions_dir()
    for name in sorted(os.listdir(d)):
        with contextlib.suppress(NoSuchSession):
            out.append(SessionInfo.load(name))
    return out


def find_session(spec: str) -> SessionInfo:
    """A session by id, or by the mountpoint it is (or was) mounted at."""
    from imagefs.mount.kernel import canonical

    if os.sep not in spec and os.path.isdir(os.path.join(sessions_dir(), spec)):
        return SessionInfo.load(spec)
    path = canonical(spec)
    for info in list_sessions():
        if info.mountpoint == path:
            return info
    raise NoSuchSession(spec)


def discard(info: SessionInfo) -> None:
    """Remove a session and its staging (its mount must be gone)."""
    if info.live():
        raise SessionLive(info.id, info.pid, info.mountpoint)
    import shutil

    shutil.rmtree(info.dir, ignore_errors=True)
