"""A mount's request loop under trio, for mounts with work beside the requests: a writable
session's control socket (commits) and periodic staging writes, a read-only mount's page
filler.  pyfuse3's own loop runs in a nursery with the mount's other tasks: the signals
that end it, the end of the process it is tied to, and the announcement once the kernel's
INIT is answered.  (A servicing transaction's mount needs none of it: plain_loop.py.)
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

from . import shim

shim.import_trio()  # first here: under shim's ldconfig guard, and made pyfuse3's

import pyfuse3  # noqa: E402
import trio  # noqa: E402

log = logging.getLogger("imagefs.mount")


class Served(Protocol):
    """What this loop uses of the operations it serves (fuse.BaseOperations)."""

    nursery: trio.Nursery | None
    on_init: Callable[[], None]

    async def background(self, nursery: trio.Nursery) -> None: ...


def run(ops: Served, announce: Callable[[], None], tied_to: int,
        init_timeout: float) -> None:
    """pyfuse3.main() and ops.background() until the mount ends (as plain_loop.run)."""
    pyfuse3.trio = trio  # type: ignore[attr-defined]
    trio.run(_serve, ops, announce, tied_to, init_timeout)


async def _serve(ops: Served, announce: Callable[[], None], tied_to: int,
                 init_timeout: float) -> None:
    initialized = trio.Event()
    ops.on_init = initialized.set
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        nursery.start_soon(_stop_on_signals)
        if tied_to:
            nursery.start_soon(_stop_when_gone, initialized, tied_to)
        await ops.background(nursery)
        nursery.start_soon(_when_initialized, initialized, announce, init_timeout)
        await pyfuse3.main(min_tasks=1, max_tasks=1)  # handlers never wait: one loop
        nursery.cancel_scope.cancel()


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _stop_when_gone(initialized: trio.Event, pid: int) -> None:
    """Unmount when process pid ends (its pidfd becomes readable), or at once if it ended
    before the mount was made (its fork server started it late)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1
    try:
        if fd >= 0:
            await trio.lowlevel.wait_readable(fd)
        # pyfuse3.terminate() before pyfuse3.main() runs is lost, and the mount would then
        # stay; the kernel's INIT is answered by main(), so once it came main() runs.
        await initialized.wait()
        log.info("process %d, which this mount serves, ended: unmounting", pid)
        pyfuse3.terminate()
    finally:
        if fd >= 0:
            os.close(fd)


async def _when_initialized(initialized: trio.Event, announce: Callable[[], None],
                            init_timeout: float) -> None:
    with trio.move_on_after(init_timeout) as scope:
        await initialized.wait()
    if scope.cancelled_caught:
        log.error("the kernel sent no INIT within %d s; giving up", init_timeout)
        pyfuse3.terminate()
        return
    announce()
