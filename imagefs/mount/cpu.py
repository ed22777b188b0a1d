"""One CPU for a servicing transaction's mount and the programs it serves.

Every request of a program in the mount is a round trip: the program sleeps in the kernel
while the mount process answers.  When the two run on different CPUs, each round trip
wakes a sleeping CPU twice, which under a hypervisor costs more than the answer itself;
on one CPU it is two context switches.  So a transaction's mount pins itself (every
thread of its process) to one CPU, and servicing.runner starts the container on that
CPU too; the transaction's own process (planning, compressing ahead, committing) keeps
the others.  `dpkg -i` in the container, interleaved runs on this 2-CPU VM: hello
0.21-0.26 s → 0.15-0.17 s, jq with its two libraries 0.33-0.35 s → 0.28 s.

The CPU is the least taken by other pinned mounts, preferring the one the mount is
already on; with one CPU allowed there is nothing to choose, and nothing is pinned.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator

from .registry import list_records


def pin_here() -> int | None:
    """Pin every thread of this process to one CPU (see the module); which, or None when
    only one is allowed."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    taken = Counter(cpu for rec in list_records() if rec.pid not in (0, os.getpid())
                    for cpu in [pinned_cpu(rec.pid)] if cpu is not None)
    here = _current_cpu()
    cpu = min(sorted(allowed), key=lambda c: (taken[c], c != here))
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})
    return cpu


def pinned_cpu(pid: int) -> int | None:
    """The one CPU process pid is pinned to, if it is pinned to exactly one."""
    try:
        cpus = os.sched_getaffinity(pid)
    except OSError:
        return None
    return next(iter(cpus)) if len(cpus) == 1 else None


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Within the block, processes this thread starts run on cpu (it is inherited); the
    thread's own CPUs are restored afterwards.  None, or a CPU this process may not use:
    nothing changes."""
    before = os.sched_getaffinity(0)
    if cpu is None or cpu not in before:
        yield
        return
    os.sched_setaffinity(0, {cpu})  # 0: this thread alone
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _current_cpu() -> int:
    """The CPU this thread last ran on (field 39 of /proc/thread-self/stat)."""
    with open("/proc/thread-self/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return int(fields[36])
