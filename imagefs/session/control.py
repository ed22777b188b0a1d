"""A writable mount's control socket: how `imagefs commit` reaches the mount process.

The session's tree lives in its mount process, so a commit must run there.  Each mount
process listens on an abstract Unix socket named after its session (no file to leave
behind, no path length limit); a request is one JSON line, the answer one JSON line:

    → {"op": "commit", "new_index": null}      (or "discard", "status")
    ← {"ok": true, "result": {"changed": true, "index": 1, ...}}
    ← {"ok": false, "error": "…", "code": 6}      (the exit code of the error)

This module is the protocol and its client (`request`, light enough for `imagefs commit`
to start fast); the server, in the mount process, is control_server.py.

Only the session's owner and root are served (SO_PEERCRED).  A commit runs in the loop's
thread, so FUSE requests wait for it and none sees the tree half-committed; while another
writer holds the image's lock the loop keeps serving and the commit polls for the lock.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from imagefs.errors import Busy, MountRefused, SystemFailure, UsageError

MAX_REQUEST = 64 * 1024
LOCK_POLL = 0.05
REFUSED = UsageError.exit_code  # a request this socket does not take
NOT_YOURS = Busy.exit_code  # the session is another user's (as the writer lock refuses)
FAILED = SystemFailure.exit_code  # the commit failed unexpectedly (logged by the mount)


def address(session_id: str) -> str:
    return f"\0imagefs/session/{session_id}"


def request(session_id: str, doc: dict[str, Any], timeout: float | None = None
            ) -> dict[str, Any]:
    """Send one request to a session's mount process; its result, or its error raised."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(address(session_id))
        except OSError as e:
            raise SystemFailure(f"session {session_id}",
                                f"its mount process does not answer ({e.strerror})") from None
        s.sendall(json.dumps(doc).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    finally:
        s.close()
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise SystemFailure(f"session {session_id}",
                            "the mount process ended without an answer; see its log") from None
    if not reply.get("ok"):
        raise MountRefused(str(reply.get("error")), int(reply.get("code") or FAILED))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}
