"""Sessions as records on disk (STATE_DIR/sessions/ID/session.json): which exist, which is
mounted where, and removing one.  Kept apart from lifecycle.py (opening, committing) so
that finding a session costs a command no import of the image format: `imagefs commit`
only finds its session and asks the mount process to do the work."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

from imagefs.errors import NoSuchSession, SessionLive
from imagefs.places import state_dir


def sessions_dir() -> str:
    d = os.path.join(state_dir(), "sessions")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@dataclass
class SessionInfo:
    """session.json: who opened what, and where it is mounted."""

    id: str
    image: str
    uuid: str
    index: int
    name: str
    mountpoint: str
    pid: int
    created: str
    uid: int
    volatile: bool = False  # Staging(volatile): a servicing transaction's own session

    @property
    def dir(self) -> str:
        return os.path.join(sessions_dir(), self.id)

    def save(self) -> None:
        path = os.path.join(self.dir, "session.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(asdict(self), fh)
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
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__
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
    shutil.rmtree(info.dir, ignore_errors=True)
