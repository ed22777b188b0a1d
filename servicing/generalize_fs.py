"""Generalize's changes in a writable root, none of which ever follows a symlink.

Every path is reached from the root's directory descriptor one name at a time, each
directory opened with O_NOFOLLOW | O_DIRECTORY relative to its parent (openat), and the
last name changed relative to its directory (unlinkat, renameat, symlinkat): a symlink
anywhere in the image, put there before or during the run, can neither lead a removal out
of the root nor turn the removal of a link into the removal of its target.  What is found
must still be what was planned (its kind), or the run stops (ServicingFailed): the plan
said exactly what would be removed, and nothing else is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable

from imagefs.errors import ServicingFailed

from .generalize_tree import DIR, FILE, LINK, Node, node_of, shown, split

MAX_FDS = 256  # directory descriptors kept open at once
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class InRoot:
    """No-follow file operations inside the root directory at path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fds: dict[str, int] = {"": os.open(path, DIR_FLAGS)}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> InRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dir(self, parts: list[str]) -> int:
        """The descriptor of the directory whose names are parts; FileNotFoundError when
        one is missing or is not a real directory (a symlink is not entered)."""
        key = "/".join(parts)
        fd = self._fds.get(key)
        if fd is not None:
            return fd
        parent = self._dir(parts[:-1])
        try:
            fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise FileNotFoundError(errno.ENOENT, "not a real directory", key) from None
            raise
        if len(self._fds) >= MAX_FDS:
            self._forget(lambda k: k != "")
        self._fds[key] = fd
        return fd

    def _forget(self, which: Callable[[str], bool]) -> None:
        for k in [k for k in self._fds if which(k)]:
            os.close(self._fds.pop(k))

    def _at(self, path: str) -> tuple[int, str]:
        parts = split(path)
        if not parts:
            raise ValueError("the root itself is never changed")
        return self._dir(parts[:-1]), parts[-1]

    def node(self, path: str) -> Node | None:
        """What is at path, never followed; None when nothing is (or a parent is not a
        real directory)."""
        try:
            fd, name = self._at(path)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
        return node_of(st, target)

    def _expect(self, path: str, kinds: tuple[str, ...]) -> Node:
        found = self.node(path)
        if found is None or found.kind not in kinds:
            what = "gone" if found is None else f"a {found.kind} now"
            raise ServicingFailed(f"{shown(path)} is {what}, not the {'/'.join(kinds)} that "
                                  "was planned")
        return found

    def remove(self, path: str, kind: str) -> None:
        """Remove what is at path, which must be of kind: a directory (empty by now: its
        contents were planned before it), or the name itself (a symlink is removed, never
        what it points at)."""
        self._expect(path, (kind,))
        fd, name = self._at(path)
        if kind == DIR:
            key = "/".join(split(path))
            self._forget(lambda k: k == key or k.startswith(key + "/"))
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ServicingFailed(f"{shown(path)} holds more than was planned "
                                          "to be removed") from None
                raise
        else:
            os.unlink(name, dir_fd=fd)

    def empty(self, path: str) -> None:
        """Truncate the regular file at path to nothing, keeping its owner and mode."""
        self._expect(path, (FILE,))
        fd, name = self._at(path)
        f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=fd)
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                raise ServicingFailed(f"{shown(path)} is no longer a regular file")
            os.ftruncate(f, 0)
        finally:
            os.close(f)

    def write(self, path: str, data: bytes, mode: int) -> None:
        """Put data at path whole (a new file renamed over the old one): a regular file
        keeps its owner and mode; anything else there (a symlink) is replaced by a file
        of root's with mode."""
        old = self._expect(path, (FILE, LINK))
        fd, name = self._at(path)
        tmp = f".{name}.imagefs-{secrets.token_hex(4)}"
        f = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600, dir_fd=fd)
        try:
            try:
                os.write(f, data)
                if old.kind == FILE:
                    os.fchown(f, old.uid, old.gid)
                    os.fchmod(f, old.mode)
                else:
                    os.fchmod(f, mode)
            finally:
                os.close(f)
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            raise

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Make the directory path, where nothing is."""
        fd, name = self._at(path)
        os.mkdir(name, mode, dir_fd=fd)

    def create(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Make the file path holding data, where nothing is (root's, with mode)."""
        fd, name = self._at(path)
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600, dir_fd=fd)
        try:
            os.write(f, data)
            os.fchmod(f, mode)
        finally:
            os.close(f)

    def symlink(self, path: str, target: str) -> None:
        """Make path a symlink to target, replacing the file or symlink there."""
        self._expect(path, (FILE, LINK))
        fd, name = self._at(path)
        tmp = f".{name}.imagefs-{secrets.token_hex(4)}"
        os.symlink(target, tmp, dir_fd=fd)
        try:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise

    def read(self, path: str, limit: int) -> bytes | None:
        """The bytes of the regular file at path (never followed); None otherwise."""
        try:
            fd, name = self._at(path)
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        dir_fd=fd)
        except OSError:
            return None
        with os.fdopen(f, "rb") as fh:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                return None
            return fh.read(limit + 1)[:limit]
