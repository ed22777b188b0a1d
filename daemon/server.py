"""The daemon: a trio server on a Unix socket, JSON-RPC 2.0 one message a line.

Task tree (each nursery's scope is its lifetime):

    serve()
    ├── signals: SIGTERM/SIGINT → shutdown()
    ├── jobs nursery: one task per job (daemon.jobs), outlives the connections
    └── connections nursery: accept loop, then per connection
        ├── reader: lines in (≤ 1 MiB each), one task per request (≤ 16 at once)
        └── writer: lines out from a bounded queue

A client that breaks the protocol gets an error answer; one that endangers the daemon is
dropped: a line over 1 MiB, half a line left hanging for LINE_TIMEOUT, or replies it does not
read (the queue fills, or a send blocks for SEND_TIMEOUT).  Everyone else goes on being
served meanwhile: no request handler blocks the loop (every stat, open and read runs in a
worker thread), and no client can hold every worker thread (daemon/limits.py: a quota of
threads per client, and per user for jobs).

Shutdown (SIGTERM): stop accepting, refuse new work, cancel the jobs that can still be
undone (abandoning those that do not stop within SHUTDOWN_GRACE) and let the others
(commits that are publishing) finish, stop the mount processes of the sessions (their
staging stays: they come back as stale sessions to remount), close the connections
(requests still in a worker thread are given up).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata  # noqa: F401  (loaded now: see imagefs.capture below)
import logging
import math
import os
import resource
import signal
import socket
import stat
from typing import Any

import trio

# Imported here, not when first used: a job acts as its caller, and a caller may not be
# able to read the interpreter's files (/root/.pyenv is root's alone), so whatever a job
# imports must already be loaded.  The library imports these two lazily (a mount process
# starts faster without them): capture (pyfastcdc) and importlib.metadata (the version).
import imagefs.capture  # noqa: F401
from imagefs.errors import Error
from imagefs.places import use_state_dir

# The api_* modules register their methods as they are imported.
from . import (  # noqa: F401
    api_drivers,
    api_features,
    api_firstboot,
    api_generalize,
    api_health,
    api_images,
    api_jobs,
    api_mounts,
    api_packages,
    api_sessions,
    api_store,
)
from .access import admitted, group_id
from .forkserver import MountForkServer
from .jobs import JobManager
from .limits import Quotas, current_quota
from .peers import Peer, peer_of
from .protocol import (
    INTERNAL_ERROR,
    LINE_TOO_LONG,
    MAX_LINE,
    METHOD_NOT_FOUND,
    PERMISSION_DENIED,
    TOO_BUSY,
    RpcError,
    encode,
    error_response,
    notification,
    parse_request,
    response,
)
from .rpc import METHODS, Call
from .state import Config, Daemon

__all__ = ["Config", "Daemon", "serve", "shutdown"]

log = logging.getLogger("imagefs.daemon")

OUT_QUEUE = 256          # answers and notifications waiting for a slow reader
IN_FLIGHT = 16           # requests one connection may have running at once
SD_LISTEN_FDS_START = 3


class Connection:
    """One client: its reader, its writer and its queue of answers."""

    def __init__(self, daemon: Daemon, stream: trio.SocketStream, peer: Peer) -> None:
        self.daemon = daemon
        self.stream = stream
        self.peer = peer
        self.queue_in, self.queue_out = trio.open_memory_channel[bytes](OUT_QUEUE)
        self.cancel_scope = trio.CancelScope()
        self.in_flight = trio.CapacityLimiter(IN_FLIGHT)
        self.quota = daemon.quotas.for_peer(peer)  # worker threads for its requests
        self.closed = False

    def send(self, doc: dict[str, Any]) -> None:
        """Queue one message; a client whose queue is full is not reading: drop it."""
        if self.closed:
            return
        try:
            self.queue_in.send_nowait(encode(doc))
        except trio.WouldBlock:
            self.drop("does not read its replies")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send(notification(method, params))

    def drop(self, why: str) -> None:
        if not self.closed:
            log.warning("dropping client pid %d uid %d: %s", self.peer.pid, self.peer.uid, why)
        self.close()

    def close(self) -> None:
        self.closed = True
        self.cancel_scope.cancel()

    async def run(self) -> None:
        with self.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                async with trio.open_nursery() as requests:
                    if not await self._reader(requests):
                        requests.cancel_scope.cancel()
                # The client is done sending (or broke the protocol): the answers queued
                # so far still go out, then the writer closes the connection.
                self.queue_in.close()
        self.closed = True

    async def _writer(self) -> None:
        async for data in self.queue_out:
            with trio.move_on_after(self.daemon.config.send_timeout) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.close()  # the client went away: nobody to answer
                    return
            if scope.cancelled_caught:
                self.drop(f"did not take a reply within {self.daemon.config.send_timeout} s")
                return
        self.close()

    async def _reader(self, requests: trio.Nursery) -> bool:
        """Read lines until the client's end closes (True) or it must go (False)."""
        buf = bytearray()
        while True:
            timeout = self.daemon.config.line_timeout if buf else math.inf
            with trio.move_on_after(timeout) as scope:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
            if scope.cancelled_caught:
                self.drop(f"left half a line for {timeout} s")
                return False
            if not data:
                return True
            buf += data
            while (end := buf.find(b"\n")) >= 0 and end <= MAX_LINE:
                line = bytes(buf[:end])
                del buf[:end + 1]
                if line.strip():
                    token = object()
                    await self.in_flight.acquire_on_behalf_of(token)
                    requests.start_soon(self._answer, line, token)
            if len(buf) > MAX_LINE:
                log.warning("client pid %d uid %d: request line over %d bytes; closing",
                            self.peer.pid, self.peer.uid, MAX_LINE)
                self.send(error_response(None, RpcError(
                    LINE_TOO_LONG, f"request line over {MAX_LINE} bytes; closing")))
                return False

    async def _answer(self, line: bytes, token: object) -> None:
        try:
            doc = await self._call(line)
            if doc is not None:
                self.send(doc)
        finally:
            self.in_flight.release_on_behalf_of(token)

    async def _call(self, line: bytes) -> dict[str, Any] | None:
        request_id: Any = None
        try:
            request_id, name, params = parse_request(line)
            m = METHODS.get(name)
            if m is None:
                raise RpcError(METHOD_NOT_FOUND, f"no method {name!r} (see docs/api.md; "
                               "daemon.status lists them)")
            kwargs = m.bind(params)
            log.debug("uid %d: %s %s", self.peer.uid, name, kwargs)
            current_quota.set(self.quota)  # this request's threads count against its client
            result = await m.handler(Call(self.daemon, self, self.peer), **kwargs)
            return response(request_id, result)
        except RpcError as e:
            return error_response(e.request_id if request_id is None else request_id, e)
        except Error as e:
            return error_response(request_id, RpcError.from_error(e))
        except OSError as e:
            return error_response(request_id, RpcError.from_os_error(e))
        except Exception as e:  # a bug: logged and answered, the daemon goes on
            log.exception("request %r failed", line[:200])
            return error_response(request_id, RpcError(
                INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}"))


# --- listening ------------------------------------------------------------------------------

def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise Error(f"the inherited socket (fd {SD_LISTEN_FDS_START}) is not a Unix "
                    "stream socket")
    sock.setblocking(False)
    return sock


def bind_socket(path: str, group: int | None) -> socket.socket:
    """Listen at path (0660, owned by the group); a stale socket file is replaced, a live
    daemon's is not."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise Error(f"{path}: exists and is not a socket; remove it or choose --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise Error(f"{path}: another daemon is listening there")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    if group is not None:
        os.chown(path, -1, group)
    sock.listen(512)
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> int:
    """Idle clients cost a descriptor each: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


async def serve(config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until SIGTERM/SIGINT (or cancellation)."""
    previous = None
    if config.state_dir:  # this process's sessions, and those its fork server mounts
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        previous = use_state_dir(config.state_dir)
    try:
        await _serve(config, task_status)
    finally:
        if config.state_dir:
            use_state_dir(previous)


async def _serve(config: Config, task_status: Any) -> None:
    gid = group_id(config.group)
    fd_limit = raise_fd_limit()
    max_conn = min(config.max_connections, max(16, fd_limit - 64))
    sock = inherited_socket()
    bound = sock is None
    if sock is None:
        sock = bind_socket(config.socket_path, gid)
    else:  # what systemd gave us is the truth about where we listen
        config.socket_path = str(sock.getsockname()) or config.socket_path
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    fork_server = MountForkServer()
    try:
        async with trio.open_nursery() as jobs_nursery:
            daemon = Daemon(config, gid,
                            JobManager(jobs_nursery, config.threads, config.jobs_per_user),
                            fork_server,
                            Quotas(config.client_threads, config.shared_threads))
            await trio.to_thread.run_sync(fork_server.start)
            adopted = await trio.to_thread.run_sync(api_sessions.adopt)
            if adopted:
                log.info("adopted %d live session(s) from before: %s", len(adopted),
                         " ".join(adopted))
            async with trio.open_nursery() as conn_nursery:
                conn_nursery.start_soon(_on_signals, daemon, conn_nursery.cancel_scope)
                state = (os.path.abspath(config.state_dir) if config.state_dir
                         else os.environ.get("IMAGEFS_STATE_DIR", "default"))
                log.info("listening on %s (group %s, state %s)", config.socket_path,
                         config.group or "-", state)
                task_status.started(daemon)
                await _accept(daemon, listener, conn_nursery, max_conn)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
            await trio.to_thread.run_sync(fork_server.close)
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(config.socket_path)
        log.info("stopped")


async def _accept(daemon: Daemon, listener: trio.SocketListener, nursery: trio.Nursery,
                  max_conn: int) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("accept: %s; pausing", e.strerror)
                await trio.sleep(0.1)
                continue
            raise
        nursery.start_soon(_serve_client, daemon, stream, max_conn)


async def _serve_client(daemon: Daemon, stream: trio.SocketStream, max_conn: int) -> None:
    async with stream:
        peer = peer_of(stream.socket)  # type: ignore[arg-type]
        if not admitted(peer, daemon.group_gid):
            await _refuse(stream, PERMISSION_DENIED, f"uid {peer.uid} is not root nor in the "
                          f"daemon's group ({daemon.config.group or 'none configured'})")
            return
        if daemon.connections >= max_conn:
            await _refuse(stream, TOO_BUSY, f"too many connections ({max_conn})")
            return
        daemon.connections += 1
        conn = Connection(daemon, stream, peer)
        try:
            await conn.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            daemon.connections -= 1
            for job in daemon.jobs.jobs.values():
                with contextlib.suppress(ValueError):
                    job.subscribers.remove(conn.notify)


async def _refuse(stream: trio.SocketStream, code: int, message: str) -> None:
    with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(encode(error_response(None, RpcError(code, message))))


async def _on_signals(daemon: Daemon, connections: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            await shutdown(daemon)
            connections.cancel()
            return


async def shutdown(daemon: Daemon) -> None:
    """Stop taking work; cancel what can be undone (abandoning what does not stop within
    the grace period), let the rest finish; stop the mounts."""
    daemon.stopping = True
    await daemon.jobs.stop(daemon.config.shutdown_grace)
    await api_sessions.stop_mounts()
