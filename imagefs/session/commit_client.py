"""Committing a session from any process (the commit verb, the daemon): found by mountpoint
or id, it is committed by its mount process through the control socket while mounted, or
here when it is stale.  Apart from mounts.py so that `imagefs commit`, the common case,
imports neither the mount process's code nor the image format: a tenth of its time."""

from __future__ import annotations

from imagefs.errors import MountRefused, UsageError

from .control import request
from .info import SessionInfo, find_session


def commit(spec: str, new_index: str | None = None, wait: float | None = None,
           who: dict[str, object] | None = None) -> tuple[SessionInfo, dict[str, object]]:
    """Commit a session's changes, by mountpoint or session id: through its mount process
    when it is mounted, directly when the session is stale."""
    info = find_session(spec)
    if info.live():
        refuse_a_transactions(info)
        return info, request(info.id, {"op": "commit", "new_index": new_index, "wait": wait,
                                       "who": who})
    from .lifecycle import Session  # the image format: only for a stale session

    session = Session.load(info)
    try:
        return info, session.commit(new_index, wait=wait, who=who)
    finally:
        session.close()


def refuse_a_transactions(info: SessionInfo) -> None:
    """A servicing transaction's session (volatile) is committed or discarded by its verb,
    once dpkg and its checks are done, and by nothing else: its mount has no control
    socket (imagefs.mount.plain_loop)."""
    if info.volatile:
        raise MountRefused(f"session {info.id} at {info.mountpoint} is a servicing "
                           "transaction's: its verb commits it when its change is applied "
                           "and checked, and discards it on failure; nothing else may",
                           UsageError.exit_code)
