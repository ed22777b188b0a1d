"""Who is calling, and what they may touch.

The daemon runs as root, so the file work it does for a caller must be the caller's: else a
member of the daemon's group could have root capture /root or export over /etc/shadow.
Two layers:

- `acting_as(peer)` makes the worker thread that does the work take the caller's
  filesystem identity (fsuid, fsgid and supplementary groups, per thread, with the raw
  system calls: glibc's setgroups() would change every thread of the daemon).  The kernel
  then checks every open, every directory read and every create as the caller's — ACLs
  included — and what the work creates belongs to the caller.  This is how NFS and SMB
  servers act for their clients.
- `checked_path()` refuses, before any work starts, what the caller cannot name: paths
  that are relative (the daemon's working directory is not the caller's), hold NUL or a
  `..` component (path_param: the same for every path parameter of every method), paths
  whose resolved target the caller's uid and groups cannot reach through the mode bits,
  and an image that is not a regular file (a FIFO would block the thread that opens it),
  with an error that names the parameter.  It never reveals whether something exists
  where the caller cannot look.

The kernel tells us the peer's uid, gid and groups (SO_PEERCRED, SO_PEERGROUPS) when it
connects (peers.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import platform
import stat
from collections.abc import Iterator

from imagefs.errors import DestinationError, NotAnImage, NotFound, UsageError
from imagefs.format.files import file_kind

from .limits import run_in_thread
from .peers import Peer
from .protocol import INVALID_PARAMS, NOT_FOUND, PERMISSION_DENIED, RpcError


def group_id(name: str | None) -> int | None:
    """The gid of the daemon's group; None when no group is configured."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"--group {name}: no such group") from None


def admitted(peer: Peer, group: int | None) -> bool:
    """Root, the daemon's own user, and members of its group are served."""
    return peer.is_root or peer.uid == os.geteuid() or (group is not None
                                                        and group in peer.groups)


# --- paths --------------------------------------------------------------------------------

READ, WRITE, CREATE = "read", "write", "create"
# What an existing path must be (kind=None: anything): an image to read or change, a
# destination file to add to (both regular files, never a FIFO or a device, whose open
# or read would block), a directory.
IMAGE, DEST, DIRECTORY = "image", "dest", "directory"


def _invalid(name: str, why: str) -> RpcError:
    return RpcError(INVALID_PARAMS, f"`{name}`: {why}")


def path_param(name: str, value: object) -> str:
    """value, if it has the form of a path on this machine: a non-empty string, without
    NUL, absolute (the daemon's working directory is not the caller's), without a `..`
    component (say the path you mean).  RpcError -32602 naming the parameter otherwise."""
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"`{name}` must be a non-empty string (a path)")
    if "\0" in value:
        raise _invalid(name, f"{value!r}: a path cannot contain NUL")
    if not value.startswith("/"):
        raise _invalid(name, f"{value!r} is relative; the daemon needs an absolute path "
                       "(its working directory is not yours)")
    if ".." in value.split("/"):
        raise _invalid(name, f"{value!r}: '..' is not allowed; give the path without it")
    return value


def session_spec(name: str, value: object) -> str:
    """A session named by its id, or by its mountpoint (a path: checked as path_param)."""
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"`{name}` must be a non-empty string (a session "
                       "id or its mountpoint)")
    if "/" in value:
        return path_param(name, value)
    if "\0" in value or value.startswith("."):
        raise _invalid(name, f"{value!r} is not a session id (nor an absolute path, the "
                       "session's mountpoint)")
    return value


def checked_path(name: str, value: object, peer: Peer, want: str,
                 kind: str | None = None) -> str:
    """The real path (symlinks resolved) of a path parameter, if peer may use it as wanted:
    READ an existing file or directory, WRITE an existing one, CREATE a new entry (the
    parent must be writable; an existing one must be writable too).  With kind, an
    existing path must also be a regular file (IMAGE, DEST: never a FIFO or a device,
    which would block the thread that opens it) or a DIRECTORY.  RpcError (or the imagefs error
    the work would raise) otherwise.  It stats; call it in a worker thread (check_path)."""
    path_param(name, value)
    assert isinstance(value, str)
    real = os.path.realpath(value)
    parent = os.path.dirname(real) or "/"
    if not peer.is_root:  # first: whether a thing exists is only told to who may look
        _searchable(name, value, parent, peer)
    exists = os.path.lexists(real)
    if want != CREATE and not exists:
        raise RpcError(NOT_FOUND, f"{value}: no such file or directory",
                       {"type": NotFound.__name__, "exit_code": NotFound.exit_code})
    if not peer.is_root:
        if want == READ:
            _allowed(name, value, real, peer, os.R_OK)
        elif want == WRITE or exists:
            _allowed(name, value, real, peer, os.W_OK | os.R_OK)
        if want == CREATE:
            _allowed(name, value, parent, peer, os.W_OK | os.X_OK)
    if kind is not None and exists:
        _is_kind(name, value, real, kind)
    return real


async def check_path(name: str, value: object, peer: Peer, want: str,
                     kind: str | None = None) -> str:
    """checked_path in a worker thread of the caller's quota (a path on a filesystem that
    does not answer blocks its stat: that must stall this caller only).  The form of the
    path is checked first, at once."""
    path_param(name, value)
    return await run_in_thread(checked_path, name, value, peer, want, kind)


def _is_kind(name: str, value: str, real: str, kind: str) -> None:
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise RpcError(PERMISSION_DENIED, f"`{name}`: {value}: {e.strerror}") from None
    if kind in (IMAGE, DEST) and not stat.S_ISREG(mode):
        what = "it is a directory" if stat.S_ISDIR(mode) else \
            f"a {file_kind(mode)}, not a regular file"
        if kind == DEST:
            raise DestinationError(value, f"exists and is not an imagefs image ({what})")
        raise NotAnImage(value, what)
    if kind == DIRECTORY and not stat.S_ISDIR(mode):
        raise UsageError(f"{value}: the {name} must be an existing directory, not a "
                         f"{file_kind(mode)}")


def _searchable(name: str, value: str, directory: str, peer: Peer) -> None:
    """Every directory from / down to directory must be searchable (x) by peer."""
    path = "/"
    for part in [p for p in directory.split("/") if p]:
        _allowed(name, value, path, peer, os.X_OK)
        path = os.path.join(path, part)
    _allowed(name, value, path, peer, os.X_OK)


def _allowed(name: str, value: str, path: str, peer: Peer, mode: int) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise RpcError(PERMISSION_DENIED, f"`{name}`: {value}: {e.strerror}") from None
    if not may(st, peer, mode):
        raise RpcError(PERMISSION_DENIED, f"`{name}`: {value}: permission denied for uid "
                       f"{peer.uid}")


def may(st: os.stat_result, peer: Peer, mode: int) -> bool:
    """The kernel's mode-bit check (owner, else group, else other) for peer."""
    if peer.is_root:
        return True
    bits = stat.S_IMODE(st.st_mode)
    if st.st_uid == peer.uid:
        have = (bits >> 6) & 7
    elif st.st_gid in peer.groups:
        have = (bits >> 3) & 7
    else:
        have = bits & 7
    need = ((4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0)
            | (1 if mode & os.X_OK else 0))
    return have & need == need


# --- acting as the caller -----------------------------------------------------------------

# setfsuid, setfsgid, setgroups: the raw system calls (per thread), by machine.
_SYSCALLS = {"x86_64": (122, 123, 116), "aarch64": (151, 152, 159)}
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    return int(_libc.syscall(ctypes.c_long(number), *args))


def _set_groups(nr: int, groups: list[int]) -> None:
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _syscall(nr, ctypes.c_long(len(groups)), arr) != 0:
        raise OSError(ctypes.get_errno(), "setgroups")


@contextlib.contextmanager
def acting_as(peer: Peer) -> Iterator[None]:
    """In the current thread, open and create files as peer (fsuid, fsgid, groups); the
    thread is itself again afterwards.  Root callers need no change."""
    if peer.is_root or os.geteuid() != 0:
        yield
        return
    calls = _SYSCALLS.get(platform.machine())
    if calls is None:
        raise RpcError(PERMISSION_DENIED, f"acting for uid {peer.uid} is not supported on "
                       f"{platform.machine()}; only root may use this daemon here")
    setfsuid, setfsgid, setgroups = calls
    saved, uid, gid = os.getgroups(), os.geteuid(), os.getegid()
    _set_groups(setgroups, sorted(peer.groups))
    _syscall(setfsgid, ctypes.c_uint(peer.gid))
    _syscall(setfsuid, ctypes.c_uint(peer.uid))
    try:
        if _syscall(setfsuid, ctypes.c_uint(0xFFFFFFFF)) != peer.uid:  # -1 reads it back
            raise RpcError(PERMISSION_DENIED, f"could not act as uid {peer.uid}")
        yield
    finally:
        _syscall(setfsuid, ctypes.c_uint(uid))
        _syscall(setfsgid, ctypes.c_uint(gid))
        _set_groups(setgroups, saved)
