"""Small file-system primitives: write all of a buffer at an offset, make a directory's
entries durable, sync a whole filesystem, open an image file without blocking, and name a
file's type."""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import time

from imagefs.errors import NoSuchImage, NotAnImage, SystemFailure


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until every byte is written (pwrite may write fewer than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def flock_within(fd: int, wait: float | None, poll: float) -> bool:
    """Take an exclusive flock on fd, trying every poll seconds for up to wait seconds
    (None: as long as it takes; flock(2) itself cannot time out); whether it was taken."""
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(poll)


def fsync_dir(path: str) -> None:
    """fsync a directory, so that a name created or renamed in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs_path(path: str) -> None:
    """syncfs(2) of the filesystem holding directory path (Python has no os.syncfs): every
    dirty page and inode of it written out; OSError if that fails."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2  # sync_file_range(2): start writing back, do not wait
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing [offset, offset+length) of fd to disk now, without
    waiting (sync_file_range(2), which Python's os lacks): a later fsync then finds most of
    a large write already on its way, as dpkg does for what it unpacks.  Advice only: a
    file that cannot take it is left as it is."""
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def open_regular(path: str, flags: int) -> int:
    """Open an image file without ever blocking: O_NONBLOCK, so that a FIFO or a device
    named as IMAGE cannot hang the open, then refuse anything but a regular file before a
    byte is read (a FIFO would hang the first read)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoSuchImage(path) from None
    except IsADirectoryError:
        raise NotAnImage(path, "it is a directory") from None
    except ValueError:  # an embedded NUL byte
        raise NotAnImage(repr(path), "a path cannot hold a NUL byte") from None
    except OSError as e:
        raise SystemFailure(path, e.strerror) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NotAnImage(path, "it is a directory")
        if not stat.S_ISREG(mode):
            raise NotAnImage(path, f"a {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_kind(mode: int) -> str:
    """What a file of this mode is, in words ("FIFO", "character device", ...)."""
    for test, word in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return word
    return "special file"




def give_back_free_memory() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim): a freed zstd
    context (~11 MB at level 9) stays in the heap otherwise, and Python's own allocations
    never reuse it, so a long job's peak would keep every context it ever had."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:  # glibc only
        trim(0)
