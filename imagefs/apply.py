"""Apply an index (or parts of it) onto a folder, with all its metadata.

Safety: every file is created relative to an open directory descriptor with O_NOFOLLOW /
O_EXCL semantics, names come from records that were checked (no "/", ".", ".."), and a
directory is only ever entered through a descriptor we created or checked with
O_DIRECTORY|O_NOFOLLOW, so nothing in an image can make apply write outside DEST.

Order per inode: create, write data (holes kept: only data extents are written, then the
size is set), chown, chmod (after chown, which clears setuid/setgid), xattrs (after chown,
which clears security.capability), times; directories get their times after their
children are in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable

from imagefs.format import layout as F
from imagefs.format.files import pwrite_all
from imagefs.format.records import Inode, check_name
from imagefs.format.view import IndexView

from .errors import CorruptImage, DestinationError, SystemFailure, UsageError

_TYPE_BITS = {F.CHR: stat.S_IFCHR, F.BLK: stat.S_IFBLK, F.FIFO: stat.S_IFIFO,
              F.SOCK: stat.S_IFSOCK}


class Applier:
    MAX_DEPTH = 2048  # PATH_MAX allows no deeper tree of one-letter names

    def __init__(self, view: IndexView, progress: Callable[[int], None] | None = None) -> None:
        self.view = view
        self.progress = progress
        self.links: dict[int, bytes] = {}  # inode ref -> path made, relative to the root fd
        self.rootfd = -1
        self.root_uid = os.geteuid() == 0
        self.dirs_seen: set[int] = set()
        # Two Python frames per level of the tree; 3.11 keeps them off the C stack.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 3 * self.MAX_DEPTH + 200))

    def _open_dest(self, dest: str) -> int:
        try:
            os.makedirs(dest, exist_ok=True)
            return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DestinationError(dest, e.strerror) from None
        except ValueError:  # a NUL byte
            raise UsageError(f"{dest!r}: a path cannot hold a NUL byte") from None

    def apply(self, dest: str) -> None:
        """The whole index onto dest (created if missing; existing entries replaced)."""
        self.rootfd = fd = self._open_dest(dest)
        try:
            root = self.view.root()
            self._fill(fd, root, os.fsencode(dest), b"", 0)
            self._set_top_meta(fd, root, os.fsencode(dest))
        finally:
            os.close(fd)
            self.links = {}

    def extract(self, dest: str, path: bytes, ino: Inode) -> None:
        """One path of the index into dest, keeping its path (parents made plainly)."""
        parts = [p for p in path.split(b"/") if p]
        if not all(check_name(p) for p in parts):  # the caller's job: never climb out
            raise UsageError(f"{_s(path)}: not a plain path inside the image")
        self.rootfd = self._open_dest(dest)
        fd = os.dup(self.rootfd)
        try:
            shown = os.fsencode(dest)
            for name in parts[:-1]:
                shown += b"/" + name
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                sub = self._enter(fd, name, shown)
                os.close(fd)
                fd = sub
            if not parts:
                self._fill(fd, ino, shown, b"", 0)
                self._set_top_meta(fd, ino, shown)
            else:
                self._make(fd, parts[-1], ino, shown + b"/" + parts[-1],
                           b"/".join(parts), 0)
        finally:
            os.close(fd)
            os.close(self.rootfd)
            self.links = {}

    def _enter(self, parent: int, name: bytes, shown: bytes) -> int:
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=parent)
        except OSError as e:
            raise DestinationError(_s(shown), f"cannot enter ({e.strerror})") from None

    def _fill(self, fd: int, directory: Inode, where: bytes, rel: bytes, depth: int) -> None:
        """Create the children of directory inside fd, depth first; a directory's own
        attributes are set after its children, so its mtime stays as captured."""
        if depth > self.MAX_DEPTH:
            raise DestinationError(_s(where), "directory tree too deep")
        for name, _kind, ref in directory.entries:
            ino = self.view.get(ref)
            self._make(fd, name, ino, where + b"/" + name, rel + b"/" + name if rel else name,
                       depth)

    def _mkdir(self, fd: int, name: bytes, path: bytes) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                os.mkdir(name, 0o700, dir_fd=fd)
        except OSError as e:
            raise DestinationError(_s(path), e.strerror) from None

    def _make(self, fd: int, name: bytes, ino: Inode, path: bytes, rel: bytes,
              depth: int) -> None:
        """Create one entry (a directory with everything under it) at fd/name."""
        try:
            self._remove_existing(fd, name, ino, path)
            if ino.kind == F.DIR:
                if ino.ref in self.dirs_seen:
                    raise CorruptImage(self.view.image.path,
                                       f"directory {_s(path)} appears twice (a cycle?)")
                self.dirs_seen.add(ino.ref)
                self._mkdir(fd, name, path)
                sub = self._enter(fd, name, path)
                try:
                    self._fill(sub, ino, path, rel, depth + 1)
                    self._set_meta(sub, None, ino)
                finally:
                    os.close(sub)
                return
            if ino.ref in self.links:
                os.link(self.links[ino.ref], name, src_dir_fd=self.rootfd, dst_dir_fd=fd,
                        follow_symlinks=False)
                return
            if ino.kind == F.REG:
                self._write_file(fd, name, ino)
            elif ino.kind == F.LNK:
                os.symlink(ino.target, name, dir_fd=fd)
            else:
                os.mknod(name, (ino.mode & 0o7777) | _TYPE_BITS[ino.kind], ino.rdev, dir_fd=fd)
            self._set_meta(fd, name, ino)
            if ino.nlink > 1:
                self.links[ino.ref] = rel
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, _Refused):
                raise SystemFailure(_s(path), "no space left on device") from None
            raise DestinationError(_s(path), e.strerror) from None

    def _remove_existing(self, fd: int, name: bytes, ino: Inode, path: bytes) -> None:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if ino.kind != F.DIR:
                raise DestinationError(_s(path), "a directory is in the way of a file")
            return
        os.unlink(name, dir_fd=fd)

    def _write_file(self, dirfd: int, name: bytes, ino: Inode) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dirfd)
        try:
            for foff, data in self.view.iter_data(ino):
                pwrite_all(fd, data, foff)
                if self.progress:
                    self.progress(len(data))
            if ino.extents == [] or ino.extents[-1][0] + ino.extents[-1][3] < ino.size:
                os.ftruncate(fd, ino.size)
        finally:
            os.close(fd)

    def _set_top_meta(self, fd: int, ino: Inode, shown: bytes) -> None:
        """The root's own attributes onto DEST itself, refusals said as _make says them."""
        try:
            self._set_meta(fd, None, ino)
        except OSError as e:
            raise DestinationError(_s(shown), e.strerror) from None

    def _set_meta(self, dirfd: int, name: bytes | None, ino: Inode) -> None:
        """Owner, mode, xattrs, times of dirfd/name (or of dirfd itself when name is None)."""
        target: int | bytes = name if name is not None else dirfd
        kw: dict[str, object] = (
            {"dir_fd": dirfd, "follow_symlinks": False} if name is not None else {})
        if self.root_uid:
            os.chown(target, ino.uid, ino.gid, **kw)  # type: ignore[arg-type]
        if ino.kind != F.LNK:
            os.chmod(target, stat.S_IMODE(ino.mode), **kw)  # type: ignore[arg-type]
        if ino.xattrs:
            xpath = target if name is None else b"/proc/self/fd/%d/%s" % (dirfd, name)
            for xname, value in ino.xattrs:
                try:
                    if isinstance(xpath, int):
                        os.setxattr(xpath, xname, value)
                    else:
                        os.setxattr(xpath, xname, value, follow_symlinks=False)
                except OSError as e:
                    if e.errno == errno.EPERM and not self.root_uid:
                        continue  # trusted./security. need root: skip as tar does
                    raise _xattr_refused(e, xname, value) from None
        os.utime(target, ns=(ino.atime_ns, ino.mtime_ns), **kw)  # type: ignore[arg-type]


def _xattr_refused(e: OSError, name: bytes, value: bytes) -> OSError:
    """The destination's refusal of one xattr, said as what it is: a filesystem that
    cannot hold a value this large (ENOSPC, E2BIG, ERANGE) is not a full disk."""
    shown = name.decode("utf-8", "backslashreplace")
    if e.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE):
        why = f"the destination filesystem cannot hold xattr {shown} ({len(value)} bytes)"
    elif e.errno == errno.EOPNOTSUPP:
        why = f"the destination filesystem does not support xattr {shown}"
    else:
        why = f"cannot set xattr {shown}: {e.strerror}"
    return _Refused(e.errno, why)


class _Refused(OSError):
    """An OSError whose strerror already says what was refused (not a disk-full)."""


def _s(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")
