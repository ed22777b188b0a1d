"""A writable mount's control socket, the mount process's side (the protocol and its client
are control.py's): it listens, checks who asks, and runs commits in the loop's thread."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from imagefs.errors import Busy, Error
from imagefs.format.files import syncfs_path
from imagefs.mount.kernel import peer_credentials

from .control import FAILED, LOCK_POLL, MAX_REQUEST, NOT_YOURS, REFUSED, address

if TYPE_CHECKING:
    from .lifecycle import Session

log = logging.getLogger("imagefs.mount")


class Served(Protocol):
    """What the control socket uses of the writable mount it serves: fuse.py's
    WritableOperations, named by what it offers so that this module need not import it."""

    session: Session
    nursery: trio.Nursery | None
    commit_lock: trio.Lock | None  # set before this serves
    discarding: bool

    def errno_for(self, exc: Exception, handler: str, args: tuple[Any, ...]) -> int: ...


async def serve_control(ops: Served, *, task_status: Any) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(address(ops.session.info.id))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    async with listener:
        while True:
            stream = await listener.accept()
            assert ops.nursery is not None
            ops.nursery.start_soon(_handle, ops, stream)


async def _handle(ops: Served, stream: trio.SocketStream) -> None:
    async with stream:
        try:
            _pid, uid, _gid = peer_credentials(stream.socket)
            request = await _read_line(stream)
            if uid not in (0, ops.session.info.uid):
                reply: dict[str, Any] = {"ok": False, "code": NOT_YOURS, "error": "this "
                                         "session belongs to another user"}
            else:
                if uid != 0:  # only root (the daemon) speaks for another caller
                    request.pop("who", None)
                reply = await _answer(ops, request)
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _read_line(stream: trio.SocketStream) -> dict[str, Any]:
    buf = b""
    with trio.move_on_after(30):
        while b"\n" not in buf and len(buf) <= MAX_REQUEST:
            data = await stream.receive_some(4096)
            if not data:
                break
            buf += data
    try:
        doc = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def _answer(ops: Served, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "commit":
        new_index = request.get("new_index")
        if new_index is not None and not isinstance(new_index, str):
            return {"ok": False, "code": REFUSED, "error": "new_index must be a string"}
        who = request.get("who")
        if who is not None and not isinstance(who, dict):
            return {"ok": False, "code": REFUSED, "error": "who must be an object"}
        wait = request.get("wait")
        deadline = None if not isinstance(wait, (int, float)) else time.monotonic() + wait
        assert ops.commit_lock is not None
        async with ops.commit_lock:
            await written_back(ops.session.info.mountpoint)
            while True:
                try:
                    return {"ok": True, "result": ops.session.commit(new_index, wait=0,
                                                                         who=who)}
                except Busy as e:  # the writer lock (not a refusal that is a kind of Busy)
                    if type(e) is not Busy or (deadline is not None
                                               and time.monotonic() >= deadline):
                        return {"ok": False, "code": e.exit_code, "error": e.message()}
                except Error as e:
                    return {"ok": False, "code": e.exit_code, "error": e.message()}
                except Exception as e:  # noqa: BLE001 - answered, logged, mount stays up
                    ops.errno_for(e, "commit", ())
                    return {"ok": False, "code": FAILED, "error": f"commit failed: {e}"}
                await trio.sleep(LOCK_POLL)
    if op == "discard":  # the session is about to be dropped: no need to save it at exit
        ops.discarding = True
        return {"ok": True, "result": {}}
    if op == "status":
        info = ops.session.info
        return {"ok": True, "result": {"session": info.id, "pid": info.pid}}
    return {"ok": False, "code": REFUSED, "error": f"unknown request {op!r}"}


async def written_back(mountpoint: str) -> None:
    """Have the kernel write back what it still holds of the mount (the writeback cache
    keeps written pages and times until close, fsync or syncfs), so that a commit takes
    every write that returned.  syncfs(2) runs in a thread: the loop must go on serving
    the WRITE and SETATTR requests it sends.  An error it returns is a write that failed
    here and was already reported to its writer (at its fsync or close, as a local
    filesystem reports writeback errors): the commit goes on without it, as it would
    without the cache, and the log says so."""
    def sync() -> None:
        try:
            syncfs_path(mountpoint)
        except OSError as e:  # also: not reachable (unmounting), nothing left to write back
            log.warning("syncfs of %s before the commit: %s (a write that failed and was "
                        "reported to its writer)", mountpoint, e.strerror)

    await trio.to_thread.run_sync(sync)
