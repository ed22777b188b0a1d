"""A small client of the daemon, blocking (Client) or for trio (AsyncClient).

    with Client() as c:                               # $IMAGEFS_SOCKET or the default
        job = c.call("images.verify", image="/srv/golden.imagefs")
        done = c.wait_job(job["job"], on_progress=print)

`call` raises RpcError for an error answer; `RpcError.exit_code` is the CLI's exit code for
it.  Notifications that arrive while a call waits are kept in `notifications` (or given to
`on_notification`).  Neither class imports anything heavy: the CLI starts fast with it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from .protocol import RpcError, encode

DEFAULT_SOCKET = "/run/imagefs/imagefs.sock"
Notification = tuple[str, dict[str, Any]]


def socket_path() -> str:
    """Where the daemon listens: $IMAGEFS_SOCKET, else the default."""
    return os.environ.get("IMAGEFS_SOCKET") or DEFAULT_SOCKET


def daemon_running(path: str | None = None) -> bool:
    """True if a daemon accepts connections at path (the CLI then goes through it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path or socket_path())
        return True
    except OSError:
        return False
    finally:
        s.close()


class _Messages:
    """Request ids, and sorting what comes back into answers and notifications."""

    def __init__(self, on_notification: Callable[[str, dict[str, Any]], None] | None) -> None:
        self._ids = itertools.count(1)
        self.notifications: list[Notification] = []
        self.on_notification = on_notification

    def request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        rid = next(self._ids)
        return rid, encode({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})

    def take(self, line: bytes, rid: int) -> tuple[bool, Any]:
        """(True, result) for the answer to rid; (False, None) for anything else."""
        doc = json.loads(line)
        if "id" not in doc:
            note = (str(doc.get("method")), doc.get("params") or {})
            if self.on_notification is not None:
                self.on_notification(*note)
            else:
                self.notifications.append(note)
            return False, None
        if doc.get("id") not in (rid, None):
            return False, None
        if "error" in doc:
            e = doc["error"]
            raise RpcError(int(e.get("code", -32603)), str(e.get("message", "")),
                           e.get("data") or {})
        return True, doc.get("result")


class Client:
    """Blocking client: one connection, one call at a time."""

    def __init__(self, path: str | None = None, timeout: float | None = None,
                 on_notification: Callable[[str, dict[str, Any]], None] | None = None
                 ) -> None:
        self.path = path or socket_path()
        self._m = _Messages(on_notification)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(self.path)
        self._file = self._sock.makefile("rb")

    @property
    def notifications(self) -> list[Notification]:
        return self._m.notifications

    def call(self, method: str, **params: Any) -> Any:
        rid, data = self._m.request(method, params)
        # Closed on us? The daemon may have said why first (a refusal): read on.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._sock.sendall(data)
        while True:
            done, result = self._m.take(self._read_line(), rid)
            if done:
                return result

    def next_notification(self) -> Notification:
        """Block until the daemon sends a notification."""
        while not self._m.notifications:
            self._m.take(self._read_line(), -1)
        return self._m.notifications.pop(0)

    def wait_job(self, job: str,
                 on_progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> dict[str, Any]:
        """Follow a job to its end (progress notifications to on_progress); the job's
        final state.  A failed or cancelled job is returned, not raised."""
        saved, self._m.on_notification = self._m.on_notification, None
        try:
            self.call("jobs.subscribe", job=job)
            while True:
                method, params = self.next_notification()
                if params.get("job") != job:
                    continue
                if method == "job.done":
                    return params
                if on_progress is not None:
                    on_progress(params)
        finally:
            self._m.on_notification = saved

    def _read_line(self) -> bytes:
        try:
            line = self._file.readline()
        except ConnectionResetError:
            line = b""
        if not line:
            raise ConnectionError(f"{self.path}: the daemon closed the connection")
        return line

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same for trio: `async with await AsyncClient.connect() as c: await c.call(...)`."""

    def __init__(self, stream: Any, path: str,
                 on_notification: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.path = path
        self._stream = stream
        self._m = _Messages(on_notification)
        self._buf = bytearray()

    @classmethod
    async def connect(cls, path: str | None = None,
                      on_notification: Callable[[str, dict[str, Any]], None] | None = None
                      ) -> AsyncClient:
        import trio

        where = path or socket_path()
        return cls(await trio.open_unix_socket(where), where, on_notification)

    @property
    def notifications(self) -> list[Notification]:
        return self._m.notifications

    async def call(self, method: str, **params: Any) -> Any:
        rid, data = self._m.request(method, params)
        await self._stream.send_all(data)
        while True:
            done, result = self._m.take(await self._read_line(), rid)
            if done:
                return result

    async def next_notification(self) -> Notification:
        while not self._m.notifications:
            self._m.take(await self._read_line(), -1)
        return self._m.notifications.pop(0)

    async def _read_line(self) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            data = await self._stream.receive_some(65536)
            if not data:
                raise ConnectionError(f"{self.path}: the daemon closed the connection")
            self._buf += data
        line = bytes(self._buf[:end + 1])
        del self._buf[:end + 1]
        return line

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
