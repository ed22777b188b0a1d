"""What the kernel says: which filesystems are mounted where, which processes are alive and
which of them use a mount, who is at the other end of a Unix socket, and the one way
imagefs detaches a mount.

/proc/self/mountinfo is the truth about what is mounted (a mount record can outlive its
mount); a FUSE mount whose server died answers ENOTCONN.  Unmounting is umount2(2) as root
and fusermount3 -u otherwise; EBUSY means processes still use the mount.  Whether a process
lives is read from /proc; which processes use a mount is psutil's (imported when asked
about: mounting and committing never need it).
"""

from __future__ import annotations

import errno
import os
import select
import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

FSTYPE = "fuse.imagefs"
MNT_DETACH = 2  # umount2 flag: detach now, finish when the last user lets go


class KernelMount(NamedTuple):
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", the bdi name
    writable: bool = False  # mounted rw (a session, for imagefs)


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
                                     _unescape(parts[sep + 2]), parts[2],
                                     "rw" in parts[5].split(",")))
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


def wait_ended(pid: int, timeout: float | None) -> bool:
    """Wait up to timeout seconds (None: as long as it takes) for process pid to end;
    whether it has.  Through a pidfd, readable once the process ends, also one that is not
    our child (as a mount tied to a verb waits for it: trio_loop, plain_loop): a poll
    every 10 ms made each servicing transaction wait 5 ms on average for its mount to end."""
    if pid <= 0:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable = select.select([fd], [], [], None if timeout is None else max(timeout, 0.0))
        return bool(readable[0]) or not pid_alive(pid)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether pid is a process that has not ended (a zombie has).  Read from
    /proc/PID/stat (the state after the command's closing parenthesis), as psutil does:
    importing psutil costs `imagefs commit` 13 ms, a tenth of its time."""
    if pid <= 0:  # not a process of anyone's (/proc/0 does not exist; -1 is not a pid)
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"x", b"")


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: _Socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (a
    socket.socket or a trio socket), as the kernel recorded them when it connected
    (SO_PEERCRED)."""
    import socket

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def is_dead(path: str) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def umount(path: str, lazy: bool = False) -> int:
    """Detach the mount at path; 0, or the errno (EBUSY: still in use)."""
    # ctypes and subprocess are imported here, not with the module: `imagefs commit`
    # loads it and never unmounts (the daemon has both imported before any job runs)
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
            return ctypes.get_errno()
        return 0
    import subprocess

    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode == 0:
        return 0
    return errno.EBUSY if "busy" in proc.stderr.lower() else errno.EPERM


def holders(mountpoint: str) -> list[tuple[int, str, str]]:
    """(pid, command, how) of each process using a path under mountpoint: as its working
    directory, root directory or program, or by an open file (or directory)."""
    import psutil

    prefix = mountpoint.rstrip("/") + "/"

    def inside(p: str | None) -> bool:
        return p is not None and (p == mountpoint or p.startswith(prefix))

    found = []
    for proc in psutil.process_iter(["name", "cwd", "exe"]):
        if proc.pid == os.getpid():
            continue
        info = proc.info  # a value psutil could not read (no permission, gone) is None
        hows = [how for how, path in (("working directory", info["cwd"]),
                                      ("root directory", _proc_link(proc.pid, "root")),
                                      ("program", info["exe"])) if inside(path)]
        if _holds_open(proc.pid, inside):
            hows.append("open file")
        if hows:
            found.append((proc.pid, info["name"] or "?", ", ".join(hows)))
    return found


# psutil has no root directory, and its open_files() stats every target (which blocks on a
# filesystem that stopped answering) and leaves out directories: these two read /proc.

def _proc_link(pid: int, link: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/{link}")
    except OSError:
        return None


def _holds_open(pid: int, inside: Callable[[str | None], bool]) -> bool:
    """Whether pid has a descriptor open on a path for which inside() is true."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return any(inside(_proc_link(pid, f"fd/{fd}")) for fd in fds)
