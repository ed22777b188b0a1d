"""Committing a session from any process (the commit verb, the daemon): found by mountpoint
or id, it is committed by its mount process through the control socket while mounted, or
here when it is stale.  Apart from mounts.py so that `imagefs commit`, the common case,
imports neither the mount process's code nor the image format: a tenth of its time."""

from __future__ import annotations

from .control import request
from .info import SessionInfo, find_session


def commit(spec: str, new_index: str | None = None, wait: float | None = None,
           who: dict[str, object] | None = None) -> tuple[SessionInfo, dict[str, object]]:
    """Commit a session's changes, by mountpoint or session id: through its mount process
    when it is mounted, directly when the session is stale."""
    info = find_session(spec)
    if info.live():
        return info, request(info.id, {"op": "commit", "new_index": new_index, "wait": wait,
                                       "who": who})
    from .lifecycle import Session  # the image format: only for a stale session

    session = Session.load(info)
    try:
        return info, session.commit(new_index, wait=wait, who=who)
    finally:
        session.close()
