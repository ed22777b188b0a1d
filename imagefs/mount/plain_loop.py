"""A mount's request loop without trio, for mounts whose every request is answered at once.

pyfuse3 runs its request loop as trio coroutines, and importing trio costs a process
~50 ms (attrs, outcome, ssl, ...): more than half of what a fork server imports before it
can mount, on a servicing transaction's critical path (the session's mount is wanted as
soon as the plan is made).  Yet pyfuse3's loop asks trio for little: to wait until the
/dev/fuse descriptor is readable, a lock, a nursery holding its one loop task, and
notify_closing() to end the wait.  pyfuse3 itself swaps trio for asyncio this way
(pyfuse3/asyncio.py: `pyfuse3.trio = ...`); here the stand-in is plainer still, and the
loop is driven by hand: run() sends into pyfuse3.main()'s coroutine, which yields only
where it waits for the descriptor, and polls that descriptor, the signals that end a mount
and the pidfd of the process the mount is tied to.

So a mount may take this loop only if nothing it does ever waits inside a request or runs
beside the requests: no control socket (commits), no periodic staging writes, no trio
anywhere.  That is a servicing transaction's volatile session (session/fuse.py,
plain_loop); other mounts keep trio (fuse.serve).

pyfuse3 imports trio when it is imported: shim.py imports it with STAND_IN as `trio` when
trio is not imported yet, and each loop then points pyfuse3 at what it runs with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

log = logging.getLogger("imagefs.mount")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ClosedResourceError(Exception):
    """Thrown into pyfuse3's wait when pyfuse3.terminate() closed the descriptor."""


class _Readable:
    """What pyfuse3's coroutine yields to run(): wait until fd is readable."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __await__(self) -> Generator[_Readable, None, None]:
        yield self


class _Lock:
    """pyfuse3's read lock: one task, never contended."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Nursery:
    """Runs what was started in it, one after the other, when its block ends (pyfuse3
    starts one loop task when asked for at most one)."""

    def __init__(self) -> None:
        self._started: list[Coroutine[Any, Any, Any]] = []

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any,
                   name: object = None) -> None:
        self._started.append(fn(*args))

    async def __aenter__(self) -> _Nursery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        while self._started:
            await self._started.pop(0)


class _Task:
    name = "pyfuse-plain"


_closing: set[int] = set()  # descriptors pyfuse3.terminate() closed


def _notify_closing(fd: int) -> None:
    _closing.add(fd)


def _stand_in() -> types.ModuleType:
    """The `trio` pyfuse3 sees under this loop: what it calls, and nothing else."""
    module = types.ModuleType("trio", "imagefs.mount.plain_loop's stand-in for pyfuse3")
    lowlevel = types.SimpleNamespace(
        wait_readable=_Readable, current_task=lambda: _Task(),
        current_trio_token=lambda: None, notify_closing=_notify_closing)
    module.lowlevel = lowlevel  # type: ignore[attr-defined]
    module.Lock = _Lock  # type: ignore[attr-defined]
    module.open_nursery = _Nursery  # type: ignore[attr-defined]
    module.ClosedResourceError = ClosedResourceError  # type: ignore[attr-defined]
    return module


STAND_IN = _stand_in()


def run(pyfuse3: Any, initialized: Callable[[], bool], announce: Callable[[], None],
        tied_to: int, init_timeout: float) -> None:
    """pyfuse3.main() until the mount ends: unmounted, a stop signal, the end of process
    tied_to (if not 0), or no INIT within init_timeout seconds.  announce() is called
    once, after the request in which initialized() became true has been answered."""
    pyfuse3.trio = STAND_IN
    _closing.clear()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}
    old_wakeup = signal.set_wakeup_fd(wake_w)
    pidfd = -1
    if tied_to:
        with contextlib.suppress(ProcessLookupError):  # gone already: stop at once
            pidfd = os.pidfd_open(tied_to)
    try:
        loop = _Loop(pyfuse3, wake_r, pidfd, tied_to, initialized, announce,
                     time.monotonic() + init_timeout)
        if tied_to and pidfd < 0:
            loop.stop(loop.verb_ended)
        loop.drive(pyfuse3.main(1, 1))
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for fd in (wake_r, wake_w, pidfd):
            if fd >= 0:
                os.close(fd)


class _Loop:
    """The state of one run(): what to poll, and why the mount is stopping."""

    def __init__(self, pyfuse3: Any, wake_r: int, pidfd: int, tied_to: int,
                 initialized: Callable[[], bool], announce: Callable[[], None],
                 init_deadline: float) -> None:
        self.pyfuse3 = pyfuse3
        self.wake_r, self.pidfd = wake_r, pidfd
        self.verb_ended = f"process {tied_to}, which this mount serves, ended: unmounting"
        self.initialized, self.announce = initialized, announce
        self.announced = False
        self.init_deadline = init_deadline
        self.why_stop = ""  # set: pyfuse3.terminate() is due, and this is logged
        self.stop_is_error = False
        self.terminated = False
        self.poller = select.poll()
        self.poller.register(wake_r, select.POLLIN)
        if pidfd >= 0:
            self.poller.register(pidfd, select.POLLIN)
        self.fuse_fd = -1

    def stop(self, why: str, error: bool = False) -> None:
        if not self.why_stop:
            self.why_stop, self.stop_is_error = why, error

    def drive(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Send into coro until it returns; where it waits, wait()."""
        throw: BaseException | None = None
        while True:
            try:
                trap = coro.throw(throw) if throw is not None else coro.send(None)
            except StopIteration:
                return
            if not isinstance(trap, _Readable):
                raise RuntimeError(f"pyfuse3 waited for {trap!r}, which the plain loop "
                                   "does not know")
            if not self.announced and self.initialized():
                self.announced = True
                self.announce()
            throw = self.wait(trap.fd)

    def wait(self, fd: int) -> BaseException | None:
        """Until fd is readable (None: resume pyfuse3) or the mount is to end (the
        exception to throw into pyfuse3's wait)."""
        if fd != self.fuse_fd:
            self.poller.register(fd, select.POLLIN)
            self.fuse_fd = fd
        while True:
            if self.why_stop and not self.terminated:
                self.terminated = True
                (log.error if self.stop_is_error else log.info)("%s", self.why_stop)
                self.pyfuse3.terminate()  # closes fd: _closing
            if fd in _closing:
                return ClosedResourceError()
            timeout = -1 if self.announced else \
                max(0, int((self.init_deadline - time.monotonic()) * 1000))
            ready = {ready_fd for ready_fd, _ev in self.poller.poll(timeout)}
            if fd in ready:
                return None
            if self.wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    for signum in os.read(self.wake_r, 64):
                        if signum in STOP_SIGNALS:
                            self.stop(f"{signal.Signals(signum).name}: unmounting")
            if self.pidfd in ready:
                self.stop(self.verb_ended)
            if not ready and not self.announced and time.monotonic() >= self.init_deadline:
                self.stop("the kernel sent no INIT in time; giving up", error=True)
