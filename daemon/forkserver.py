"""A warm process that mounts: pyfuse3, trio and imagefs are imported once, and each
mount is a fork of it.

`imagefs mount` spends most of its time importing: the mount process needs pyfuse3, which
needs trio, and those imports alone take longer than a C driver takes to mount.  The daemon
therefore keeps one of these (`python -m daemon.forkserver FD`, started by
MountForkServer): single-threaded, never serving a mount itself (pyfuse3 allows one session
per process), it waits on a SOCK_SEQPACKET socket for requests.  Each request is one JSON
message with one file descriptor attached, the end of a socket to answer on.  The server
forks a child per request and goes back to waiting; the child takes the caller's
credentials (uid, gid, groups, as the daemon learned them from SO_PEERCRED), so the kernel
checks every path as it would for the caller's own `imagefs mount`, then runs
mounts.start(), which forks the mount process and returns once it is ready; the child
answers with the mount's record, or the error and its exit code (one line of JSON), reads
the request's `warm` paths in the new mount until done or until the caller lets go
(PendingMount.release), and exits.  (A session's
writable mount is root's, made for the session's owner, as `imagefs mount --rw` run by
root for them would be; the daemon has checked its paths as the caller.)  The mount
process belongs to nobody but itself (setsid): the daemon and this server may stop or
restart without taking mounts with them.

The server ends when the daemon closes its end of the socket.

A servicing verb run without a daemon (`imagefs package add IMAGE INDEX ...`) starts one
of its own, forked from itself (daemon.forked_server) before it imports and plans
anything, and adopts it (`MountForkServer(fork_server, started)`): the imports a mount
needs then run on the other CPU while the verb plans, and the verb asks for its sessions'
mounts before it plans (servicing.transaction), so that they come up meanwhile.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import INTERNAL_ERROR, Error, MountRefused, SystemFailure

log = logging.getLogger("imagefs.forkserver")
MAX_REQUEST = 64 << 10
# Starts a server: the process (a Popen, or what has its poll, wait and kill) and this end of
# its socket.
Starter = Callable[[], tuple[Any, socket.socket]]
ANSWER_TIMEOUT = 60.0  # a mount that is not ready by then has failed (the kernel's INIT
# alone may take up to fuse.INIT_TIMEOUT, 10 s)


@dataclass
class MountRequest:
    """What to mount, and as whom."""

    image: str  # absolute paths: the server's working directory is not the caller's
    index: str
    mountpoint: str
    options: list[str] = field(default_factory=list)  # -o values
    uid: int | None = None  # None: as the server itself (a session's mount)
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    run_dir: str | None = None  # where the caller's `imagefs mounts` looks for records
    writable: bool = False  # a session's mount: root's (uid 0), for `owner`
    session: str | None = None  # with writable: serve this stale session again
    owner: int | None = None  # with writable: whose session it is
    state_dir: str | None = None  # with writable: where the session lives (the daemon's)
    tied_to: int = 0  # a pid: the mount ends when that process does (servicing's mounts)
    volatile: bool = False  # with writable: a session never fsynced (servicing's)
    cache: str | None = None  # image an index of a store: where its objects are kept
    cache_size: int | None = None  # ... and how much of its packs at most
    warm: list[str] = field(default_factory=list)  # paths under the mount read once it is
    # ready, for what the caller runs there next (imagefs.mount.warm)


class MountForkServer:
    """The daemon's side: starts the server (again, should it die) and asks it for mounts.
    Blocking and thread-safe: call mount() from a worker thread.

    starter: how to start the server instead of a new interpreter (daemon.forked_server's
    fork_server, a fork of this process: made while it has no thread yet, as a fork copies
    no other thread, nor a lock one held); started: one it already started."""

    def __init__(self, starter: Starter | None = None,
                 started: tuple[Any, socket.socket] | None = None) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None  # a Popen, or what starter gave (poll, wait, kill)
        self._sock: socket.socket | None = None
        self._starter = starter
        if started is not None:
            self._proc, self._sock = started

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._starter is not None:
            self._proc, self._sock = self._starter()
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.forkserver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    def _send(self, message: bytes, fd: int) -> None:
        with self._lock:
            for attempt in (1, 2):  # a server that died is started again, once
                if self._sock is None or self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                assert self._sock is not None
                try:
                    socket.send_fds(self._sock, [message], [fd])
                    return
                except OSError:
                    if attempt == 2:
                        raise
                    self._stop()

    def mount(self, request: MountRequest, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """Mount as request says; the mount's record (MountRecord.to_json()) once it is
        ready, or the mount's error raised with its exit code."""
        pending = self.begin(request, timeout)
        try:
            return pending.wait()
        finally:
            pending.release()

    def begin(self, request: MountRequest, timeout: float = ANSWER_TIMEOUT) -> PendingMount:
        """Ask for the mount and return at once: the mount, pending."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._send(json.dumps(asdict(request)).encode(), theirs.fileno())
        except OSError as e:
            ours.close()
            raise MountRefused(f"{request.mountpoint}: the daemon's fork server does "
                               f"not answer ({e.strerror or e})") from None
        finally:
            theirs.close()
        return PendingMount(request, ours, timeout)

    def close(self, wait: bool = True) -> None:
        """Stop the server (mounts it made go on): it ends when its socket does.  wait:
        and reap it (a verb's own server, which dies with the verb, need not be waited
        for: ~2.5 ms at the end of `package add`)."""
        with self._lock:
            self._stop(wait)

    def _stop(self, wait: bool = True) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and wait:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


class PendingMount:
    """A mount asked of the server.  wait() returns its record once it is ready (or
    raises its error with its exit code), as often as asked, the same each time;
    release() lets the server's child go, which reads the request's `warm` paths in the
    mount until then (the mount cannot be unmounted while it does): call it once done
    with the mount's caches, and always before unmounting."""

    def __init__(self, request: MountRequest, sock: socket.socket, timeout: float) -> None:
        self.request = request
        self._sock: socket.socket | None = sock
        self._timeout = timeout
        self._answer: dict[str, Any] | None = None

    def wait(self) -> dict[str, Any]:
        if self._answer is None:
            try:
                self._answer = self._read_answer()
            except MountRefused as e:  # asked again, the same answer
                self._answer = {"error": e.message(), "exit_code": e.exit_code}
        if "error" in self._answer:
            raise MountRefused(str(self._answer["error"]),
                               int(self._answer.get("exit_code") or SystemFailure.exit_code))
        return dict(self._answer["record"])

    def release(self) -> None:
        """End the child's reading ahead, and wait (up to ANSWER_TIMEOUT) until it has let
        go of the mount: it stops when this end of the socket closes, and its end
        closes when it exits."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(ANSWER_TIMEOUT)
            while sock.recv(65536):
                pass

    def _read_answer(self) -> dict[str, Any]:
        """The answer: one line of JSON (the child may go on reading ahead after it)."""
        sock = self._sock
        mountpoint = self.request.mountpoint
        if sock is None:
            raise MountRefused(f"{mountpoint}: the mount request was let go of")
        sock.settimeout(self._timeout)
        data = b""
        try:
            while b"\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
        except TimeoutError:
            raise MountRefused(f"{mountpoint}: the mount was not ready within "
                               f"{self._timeout:.0f} s") from None
        try:
            answer = json.loads(data.partition(b"\n")[0])
            if not isinstance(answer, dict) or not ("error" in answer or "record" in answer):
                raise ValueError(answer)
        except ValueError:
            raise MountRefused(f"{mountpoint}: the mount's starter died before it "
                               "answered") from None
        return answer


# Everything a mount process needs, imported once, in the server (not psutil: only a busy
# unmount asks it who holds the mount, in the unmounting process).  Not trio: a servicing
# transaction's mount runs without it (imagefs.mount.plain_loop), and a verb's own server
# makes only those, ~50 ms sooner.
MOUNT_MODULES = ("setproctitle", "imagefs.format.packs", "imagefs.format.records",
                 "imagefs.format.view", "imagefs.image", "imagefs.mount.fuse",
                 "imagefs.mount.tree", "imagefs.mount.warm", "imagefs.session.fuse",
                 "imagefs.session.lifecycle", "imagefs.session.mounts")
# ...and in the daemon's server, what any of its mounts might import later: they may act
# as another user (setuid), who may not be able to read the interpreter's files (a verb's
# own server mounts as its verb's user).  Its other mounts run under trio (trio_loop, with
# the control socket of a session).
DAEMON_MODULES = ("importlib.metadata", "imagefs.capture", "imagefs.mount.trio_loop",
                  "imagefs.session.control_server")


def preload(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


def serve(sock: socket.socket, title: str = "") -> None:
    """Fork a mount per request until the other end closes."""
    preload(MOUNT_MODULES)
    from setproctitle import setproctitle

    setproctitle(title or f"imagefs forkserver (of the daemon, pid {os.getppid()})")

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's Ctrl-C is the daemon's
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, 1)
        except InterruptedError:
            continue
        if not message:
            return
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sock.close()
                answer, warm = _mount(message, fds[0])
                with socket.socket(fileno=fds[0]) as caller, contextlib.suppress(OSError):
                    caller.sendall(json.dumps(answer).encode() + b"\n")
                    if warm and "record" in answer:
                        _warm(answer["record"]["mountpoint"], warm, caller)
                code = 0
            finally:
                os._exit(code)
        os.close(fds[0])


def _warm(mountpoint: str, paths: list[str], caller: socket.socket) -> None:
    """In the child, once the caller has its answer: read what it will run there next
    into the kernel's caches, on this CPU while the caller goes on planning, until done
    or until the caller lets go (PendingMount.release: its end of the socket closed)."""
    from imagefs.mount.warm import warm

    def let_go() -> bool:
        return bool(select.select([caller], [], [], 0)[0])

    with contextlib.suppress(Exception):  # only ever a saving of time
        warm(mountpoint, paths, stop=let_go)


def _mount(message: bytes, answer_fd: int) -> tuple[dict[str, Any], list[str]]:
    """In the child: become the caller, mount, and say how it went; and what to warm."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # libfuse waits for fusermount3
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        req = MountRequest(**json.loads(message))
        if req.uid is not None and req.uid != os.geteuid():
            if os.geteuid() != 0:
                raise MountRefused(f"{req.mountpoint}: this daemon runs as uid "
                                   f"{os.geteuid()} and cannot mount as uid {req.uid}")
            os.setgroups(req.groups)
            os.setgid(req.gid if req.gid is not None else req.uid)
            os.setuid(req.uid)
        from imagefs.places import use_run_dir, use_state_dir
        from imagefs.session.lifecycle import SessionInfo
        from imagefs.session.mounts import start

        use_run_dir(req.run_dir)  # None: this server's own (the daemon's environment's)
        use_state_dir(req.state_dir)
        stale = SessionInfo.load(req.session) if req.session else None
        rec = start(req.image, req.index, req.mountpoint, req.options,
                    writable=req.writable, session=stale, owner=req.owner,
                    not_inherited=(answer_fd,), tied_to=req.tied_to, volatile=req.volatile,
                    opener=_store_opener(req))
        return {"record": rec.to_json()}, [str(p) for p in req.warm]
    except Error as e:
        return {"error": e.message(), "exit_code": e.exit_code}, []
    except OSError as e:
        return {"error": SystemFailure(e.filename or "mount", e.strerror).message(),
                "exit_code": SystemFailure.exit_code}, []
    except Exception as e:  # the answer must come, whatever happened
        log.exception("mount request failed")
        return {"error": f"internal error: {type(e).__name__}: {e}",
                "exit_code": INTERNAL_ERROR}, []


def _store_opener(req: MountRequest) -> Callable[[], Any] | None:
    """For an index of a store: how to open it (the server's S3 credentials, the caller's
    cache); None for an image file."""
    from imagefs.store import is_store_url  # not the client: 5 ms of each mount

    if not is_store_url(req.image):
        return None
    from imagefs.store.cache import DEFAULT_LIMIT
    from imagefs.store.remote import open_store_index

    return lambda: open_store_index(req.image, req.index, None, req.cache,
                                    req.cache_size or DEFAULT_LIMIT)


def main(argv: list[str]) -> int:
    logging.basicConfig(format="imagefs-forkserver[%(process)d]: %(message)s")
    try:
        fd = int(argv[0])
    except (IndexError, ValueError):
        print("usage: python -m daemon.forkserver FD (started by the imagefs daemon)",
              file=sys.stderr)
        return 2
    preload(DAEMON_MODULES)
    with socket.socket(fileno=fd) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
