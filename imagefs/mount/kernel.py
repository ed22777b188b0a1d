"""What the kernel says: which filesystems are mounted where, which processes are alive and
which of them use a mount, and the one way imagefs detaches a mount.

/proc/self/mountinfo is the truth about what is mounted (a mount record can outlive its
mount); a FUSE mount whose server died answers ENOTCONN.  Unmounting is umount2(2) as root
and fusermount3 -u otherwise; EBUSY means processes still use the mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from dataclasses import dataclass

FSTYPE = "fuse.imagefs"
MNT_DETACH = 2  # umount2 flag: detach now, finish when the last user lets go


@dataclass(frozen=True)
class KernelMount:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", the bdi name


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = bytearray()
    raw = os.fsencode(field_)
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def kernel_mounts() -> list[KernelMount]:
    found = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            parts = os.fsdecode(line.rstrip(b"\n")).split(" ")
            try:
                sep = parts.index("-", 6)
            except ValueError:
                continue
            found.append(KernelMount(_unescape(parts[4]), parts[sep + 1],
                                     _unescape(parts[sep + 2]), parts[2]))
    return found


def canonical(path: str) -> str:
    """An absolute path with the parent's symlinks resolved, without touching path itself
    (a dead FUSE mount answers ENOTCONN to stat)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) \
        if path != "/" else "/"


def find_mount(path: str) -> KernelMount | None:
    """The topmost mount at exactly path."""
    path = canonical(path)
    hit = None
    for m in kernel_mounts():
        if m.mountpoint == path:
            hit = m
    return hit


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def is_dead(path: str) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def umount(path: str, lazy: bool = False) -> int:
    """Detach the mount at path; 0, or the errno (EBUSY: still in use)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
            return ctypes.get_errno()
        return 0
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode == 0:
        return 0
    return errno.EBUSY if "busy" in proc.stderr.lower() else errno.EPERM


def holders(mountpoint: str) -> list[tuple[int, str, str]]:
    """(pid, command, how) of each process using a path under mountpoint."""
    prefix = mountpoint.rstrip("/") + "/"

    def inside(p: str) -> bool:
        return p == mountpoint or p.startswith(prefix)

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        hows = []
        for link, how in (("cwd", "working directory"), ("root", "root directory"),
                          ("exe", "program")):
            with contextlib.suppress(OSError):
                if inside(os.readlink(f"{base}/{link}")):
                    hows.append(how)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    if inside(os.readlink(f"{base}/fd/{fd}")):
                        hows.append("open file")
                        break
        if hows:
            try:
                with open(f"{base}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                comm = "?"
            found.append((int(entry), comm, ", ".join(hows)))
    return found
