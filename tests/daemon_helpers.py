"""Helpers for the daemon tests: images to serve, an in-process daemon (pytest-trio), a
daemon in a child process (for SIGKILL and SIGTERM), and clients that run as other users
(forked children that drop to another uid and groups before they connect)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import trio
from conftest import (
    REPO,
    is_mounted,
    kernel_imagefs_mounts,
    pid_alive,
    public_dir,
    run_imagefs,
    wait_until,
)

from daemon.client import AsyncClient, Client
from daemon.protocol import RpcError

TEST_GID = 47123        # the daemon's group in these tests (numeric: no /etc/group edit)
OTHER_GID = 47124       # a group that is not the daemon's
NOBODY = 65534


def two_index_image(tmp_path: Path) -> Path:
    """tmp_path/small.imagefs: indices "base" and "second" of the same small tree (an
    /etc/hostname and 1 MiB of random data)."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("golden\n")
    (src / "data").write_bytes(os.urandom(1 << 20))
    image = tmp_path / "small.imagefs"
    run_imagefs("capture", src, image, "--name", "base")
    run_imagefs("capture", src, image, "--name", "second")
    return image


def big_tree(root: Path, mib: int = 48) -> Path:
    """Incompressible bytes, enough that a capture or export takes a while."""
    root.mkdir()
    for i in range(mib // 8):
        (root / f"f{i}").write_bytes(os.urandom(8 << 20))
    return root


@contextlib.asynccontextmanager
async def daemon_in_process(sock: Path, group: str | None = str(TEST_GID),
                            **config: Any) -> AsyncIterator[Any]:
    """serve() in this trio loop; at the end its sessions' mounts are stopped and it is
    cancelled."""
    from daemon.server import Config, serve, shutdown

    async with trio.open_nursery() as nursery:
        d = await nursery.start(serve, Config(socket_path=str(sock), group=group, **config))
        try:
            yield d
        finally:
            with trio.CancelScope(shield=True):
                await shutdown(d)
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def client(sock: Path) -> AsyncIterator[AsyncClient]:
    c = await AsyncClient.connect(str(sock))
    try:
        yield c
    finally:
        await c.aclose()


async def raw_exchange(sock: Path, data: bytes, replies: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes on a fresh connection; read `replies` lines back."""
    s = await trio.open_unix_socket(str(sock))
    async with s:
        await s.send_all(data)
        buf = b""
        with trio.fail_after(10):
            while buf.count(b"\n") < replies:
                chunk = await s.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def as_user(uid: int, groups: list[int], fn: Callable[[], Any]) -> Any:
    """Run fn in a forked child with uid, gid nogroup (65534) and the supplementary groups
    (as `usermod -aG` makes a member); its return value (JSON) or the RpcError it raised
    comes back as a dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, call, report, exit
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(uid)
            try:
                out: dict[str, Any] = {"result": fn()}
            except RpcError as e:
                out = {"error": {"code": e.code, "message": e.message}}
            except OSError as e:
                out = {"oserror": e.errno, "message": str(e)}
            os.write(w, json.dumps(out).encode())
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"died": True}


def call_as(sock: Path, uid: int, groups: list[int], method: str, **params: Any) -> Any:
    def go() -> Any:
        with Client(str(sock), timeout=30) as c:
            return c.call(method, **params)

    return as_user(uid, groups, go)


async def call_as_async(sock: Path, uid: int, groups: list[int], method: str,
                        **params: Any) -> Any:
    """call_as from a trio test: the forked child is waited for in a thread, so the
    in-process daemon goes on serving it."""
    return await trio.to_thread.run_sync(lambda: call_as(sock, uid, groups, method, **params))


class DaemonProcess:
    """`imagefs daemon` in a child process of ours (ended by its pid)."""

    def __init__(self, sock: Path, state: Path, log: Path, args: tuple[str, ...] = ()) -> None:
        self.sock, self.state, self.log, self.args = sock, state, log, args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = {**os.environ, "IMAGEFS_STATE_DIR": str(self.state),
               "PYTHONPATH": str(REPO)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imagefs.cli", "daemon", "--socket", str(self.sock),
                 *self.args],
                env=env, stdout=log, stderr=log, start_new_session=True)
        assert wait_until(lambda: self._answers(), 15), self.log.read_text()
        return self

    def _answers(self) -> bool:
        try:
            with Client(str(self.sock), timeout=2) as c:
                c.call("daemon.status")
            return True
        except (OSError, RpcError):
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 60) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM; SIGKILL if it has not ended within timeout.  Reaped either way."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.kill(signal.SIGTERM, timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)


@contextlib.contextmanager
def daemon_process(root: Path, *args: str) -> Iterator[DaemonProcess]:
    """`imagefs daemon --socket root/d.sock ARGS` (state and log in root); stopped at the
    end, also when the test fails."""
    d = DaemonProcess(root / "d.sock", root / "state", root / "daemon.log", args)
    try:
        yield d.start()
    finally:
        d.stop()


def end_sessions(state: Path, under: Path) -> None:
    """Teardown: stop the mount processes of sessions in state (ours, by the pid their
    session.json names) and unmount anything left under `under`."""
    sessions = state / "sessions"
    if sessions.is_dir():
        for s in sessions.iterdir():
            with contextlib.suppress(OSError, ValueError):
                pid = json.loads((s / "session.json").read_text()).get("pid")
                if pid and pid_alive(pid):
                    os.kill(pid, signal.SIGTERM)
                    wait_until(lambda pid=pid: not pid_alive(pid), 15)
    for m in kernel_imagefs_mounts():
        if m.startswith(str(under)):
            subprocess.run(["umount", "-l", m], capture_output=True)


__all__ = ["NOBODY", "OTHER_GID", "TEST_GID", "DaemonProcess", "as_user", "big_tree",
           "call_as_async", "call_as", "client", "daemon_in_process", "daemon_process",
           "end_sessions", "is_mounted", "public_dir", "two_index_image"]
