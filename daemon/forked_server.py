"""The fork server of a verb run without a daemon, forked from the verb itself before the
verb imports anything more: this module imports only what a fork needs, so the server
starts importing what a mount needs (pyfuse3, trio, imagefs) ~30 ms sooner, on the other
CPU, while the verb goes on to plan (daemon.forkserver; for `package add` of hello the
session's mount is on the critical path).  The server dies with the verb (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import socket

PR_SET_PDEATHSIG = 1  # prctl(2)


class ForkedServer:
    """The server as a fork of this process: what MountForkServer needs of a Popen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, ours: socket.socket, theirs: socket.socket) -> ForkedServer:
        """Fork the server: it serves theirs; ours is the caller's end."""
        parent = os.getpid()
        pid = os.fork()
        if pid:
            return cls(pid)
        code = 1
        try:  # the server: no output of its own on the verb's stdout, no end of its socket
            die_with(parent)
            ours.close()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            from .forkserver import serve

            serve(theirs, f"imagefs forkserver (of pid {os.getppid()})")
            code = 0
        finally:
            os._exit(code)  # never the verb's atexit handlers or buffered output

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it ended (woken by its pidfd, not polling: the verb waits
        for it last, after its commit)."""
        import subprocess

        from imagefs.mount.kernel import wait_ended

        if self.poll() is None:
            if not wait_ended(self.pid, timeout):
                raise subprocess.TimeoutExpired(f"forkserver {self.pid}", timeout or 0.0)
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def fork_server() -> tuple[ForkedServer, socket.socket]:
    """A fork server forked from this process now, and this end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        server = ForkedServer.start(ours, theirs)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return server, ours


def die_with(parent: int) -> None:
    """SIGKILL this process when parent ends (prctl PR_SET_PDEATHSIG), also while it still
    imports: a verb killed then leaves no server waiting for its socket's end."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)
