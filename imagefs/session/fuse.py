"""The FUSE side of a writable mount: pyfuse3 Operations over tree.SessionTree.

A thin adapter like the read-only one (imagefs.mount.fuse), with the same error boundary.
Besides answering requests it keeps the kernel's lookup counts exact (every entry handed
to the kernel counts; forget subtracts), so that a removed file lives while the kernel or
an opener holds it, and it writes the staging to disk every SYNC_INTERVAL and on fsync.
Directory handles are fuse_dirs.py's.
The kernel's writeback cache holds written pages until close, fsync or syncfs (a commit
first has them written back: control_server.written_back); a servicing transaction's mount
goes without it (see writeback_cache).

A commit arrives on the session's control socket (control_server.py) and runs in the loop's
thread, between two requests: the tree it writes is the tree as it stands, and no request
sees it half-committed.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pyfuse3

from imagefs.format import layout as F
from imagefs.mount import shim
from imagefs.mount.fuse import boundary
from imagefs.mount.tree import Refusal

from .fuse_dirs import DirectoryHandles
from .lifecycle import Session
from .staging import NEW_INO_BASE, SYNC_INTERVAL
from .tree import SessionTree

if TYPE_CHECKING:
    import trio

log = logging.getLogger("imagefs.mount")


class WritableOperations(DirectoryHandles):
    enable_acl = True  # the kernel enforces ACLs; the tree and acl.py keep them

    def __init__(self, session: Session, label: str) -> None:
        super().__init__(label)
        self.session = session
        self.tree: SessionTree = session.tree
        self.packs = self.tree.view.packs
        self.commit_lock: trio.Lock | None = None  # the trio loop's (background())
        self.discarding = False
        self.shares_cpu = session.info.volatile  # a servicing transaction's
        # A transaction's mount is committed by its verb, after it ended, and nothing else
        # may commit or discard it; it is never written to disk before its end: nothing
        # beside its requests, so no trio (plain_loop.py, ~50 ms sooner up).
        self.plain_loop = session.info.volatile
        # Not for a transaction's mount: with the kernel's writeback cache, every close
        # marks the file's block count stale, so the next stat of it asks the mount again,
        # and dpkg stats /etc/passwd and /etc/group, and every program it starts its
        # libraries, after each close: 772 GETATTRs instead of 232 for `package add` of
        # hello, its dpkg 0.145 -> 0.130 s.  Its few writes gain little from the cache.
        self.writeback_cache = not session.info.volatile

    def shim_handlers(self) -> tuple[Any, ...]:
        return (self.lseek, True, shim.FREE_OPENS_FILES, self.fallocate_sync,
                self.setxattr_sync, True, self.fast_handlers(), self.writeback_cache)

    def fast_functions(self) -> dict[str, Callable[..., Any]]:
        tree = self.tree

        def lookup(parent: int, name: bytes) -> tuple[Any, ...]:
            self.check_fault(name)
            ino = tree.lookup(parent, name)
            if ino is None:
                return self.NEGATIVE
            attrs = self.attr_tuple(ino, tree.attrs(ino))
            tree.remember(ino, parent)
            return attrs

        def getxattr(ino: int, name: bytes) -> bytes | int:
            try:
                return tree.xattr(ino, name)
            except Refusal:
                return -pyfuse3.ENOATTR

        return {
            "lookup": lookup,
            "getattr": lambda ino: self.attr_tuple(ino, tree.attrs(ino)),
            "readlink": tree.readlink,
            "getxattr": getxattr,
            "listxattr": lambda ino: b"".join(n + b"\0" for n, _v in tree.xattrs(ino)),
            "read": tree.read,
            "write": tree.write,
            "release": tree.released_file,
            "forget": tree.forget,
            **self.dir_fast_functions(),
            **self.change_fast_functions(),
        }

    def change_fast_functions(self) -> dict[str, Callable[..., Any]]:
        """The fast handlers of the requests that change the tree (the shim passes the
        caller's uid, gid and umask to those that make an inode); each answers as its
        coroutine below does, through the same code."""

        def setattr_(ino: int, mode: int | None, uid: int | None, gid: int | None,
                     size: int | None, atime_ns: int | None, mtime_ns: int | None,
                     ctime_ns: int | None) -> tuple[Any, ...]:
            node = self.tree.setattr(ino, mode=mode, uid=uid, gid=gid, size=size,
                                     atime_ns=atime_ns, mtime_ns=mtime_ns, ctime_ns=ctime_ns)
            return self.attr_tuple(ino, node)

        def made(parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int,
                 rdev: int = 0, target: bytes = b"") -> tuple[Any, ...]:
            ino = self._make(parent, name, mode, uid, gid, umask, rdev, target)
            return self.attr_tuple(ino, self.tree.attrs(ino))

        def create(parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int,
                   umask: int) -> tuple[Any, ...]:
            attrs = made(parent, name, (mode & 0o7777) | 0o100000, uid, gid, umask)
            self.tree.opened_file(attrs[0])
            return attrs

        def link(ino: int, parent: int, name: bytes) -> tuple[Any, ...]:
            self.tree.link(ino, parent, name)
            self.tree.remember(ino, parent)
            return self.attr_tuple(ino, self.tree.attrs(ino))

        def done(fn: Callable[..., Any]) -> Callable[..., int]:
            def call(*args: Any) -> int:
                fn(*args)
                return 0
            return call

        return {
            "setattr": setattr_,
            "create": create,
            "mknod": lambda parent, name, mode, rdev, uid, gid, umask: made(
                parent, name, mode, uid, gid, umask, rdev=rdev),
            "mkdir": lambda parent, name, mode, uid, gid, umask: made(
                parent, name, (mode & 0o7777) | 0o040000, uid, gid, umask),
            "symlink": lambda parent, name, target, uid, gid, umask: made(
                parent, name, 0o120777, uid, gid, umask, target=target),
            "link": link,
            "unlink": done(self.tree.unlink),
            "rmdir": done(self.tree.rmdir),
            "rename": done(self.tree.rename),
            "statfs": lambda ino: self._statfs(),
        }

    async def background(self, nursery: trio.Nursery) -> None:
        import trio

        from .control_server import serve_control

        self.commit_lock = trio.Lock()
        nursery.start_soon(self._sync_every_interval)
        await nursery.start(serve_control, self)

    def finished(self) -> None:
        if self.discarding:
            return
        try:
            self.session.staging.sync(durable=True)
        except Exception as e:  # noqa: BLE001 - the last words must not hide the exit
            log.error("%s: could not write the staging at exit: %s", self.label, e)

    async def _sync_every_interval(self) -> None:
        import trio

        while True:
            await trio.sleep(SYNC_INTERVAL)
            try:
                self.session.staging.sync()
            except Exception as e:  # noqa: BLE001 - retried at the next interval
                log.error("%s: writing the staging failed (retrying): %s", self.label, e)

    # --- attributes ---------------------------------------------------------------------

    def path_of(self, inode: int) -> bytes | None:
        if inode >= NEW_INO_BASE:  # created in the session: no base record names it
            return None
        return self.tree.base.path_of(inode)

    def entry(self, ino: int, parent: int) -> pyfuse3.EntryAttributes:
        """Attributes handed to the kernel with a new reference to ino."""
        attrs = self.attributes(ino, self.tree.attrs(ino))
        self.tree.remember(ino, parent)
        return attrs

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        self.check_fault(name)
        ino = self.tree.lookup(parent_inode, name)
        if ino is None:
            return self.negative_entry()
        return self.entry(ino, parent_inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.tree.forget(ino, count)
            except Exception as e:  # noqa: BLE001 - forget never fails (pyfuse3's contract)
                log.error("%s: forget(%d): %s", self.label, ino, e)

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attributes(inode, self.tree.attrs(inode))

    @boundary
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.tree.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None)
        return self.attributes(inode, node)

    @boundary
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.tree.readlink(inode)

    def _statfs(self) -> tuple[int, ...]:
        """(bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax): the
        staging's filesystem, with the session's files counted as used inodes."""
        v = self.tree.statfs()
        return (v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail,
                self.tree.files_count() + v.f_ffree, v.f_ffree, v.f_ffree, 255)

    @boundary
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
         s.f_favail, s.f_namemax) = self._statfs()
        return s

    # --- names ----------------------------------------------------------------------------

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int,
              rdev: int = 0, target: bytes = b"") -> int:
        """Make an inode for the caller (uid, gid, umask) and hand it to the kernel: a
        setgid directory passes on its group (and, to new directories, the setgid bit),
        as on ext4."""
        d = self.tree.attrs(parent)
        if d.mode & 0o2000:
            gid = d.gid
            if mode & 0o170000 == 0o040000:
                mode |= 0o2000
        node = self.tree.make(parent, name, mode, uid, gid, rdev, target, umask=umask)
        self.tree.remember(node.ino, parent)
        return int(node.ino)

    def _made(self, parent: int, name: bytes, mode: int, ctx: Any, rdev: int = 0,
              target: bytes = b"") -> pyfuse3.EntryAttributes:
        ino = self._make(parent, name, mode, ctx.uid, ctx.gid, getattr(ctx, "umask", 0o022),
                         rdev, target)
        return self.attributes(ino, self.tree.attrs(ino))

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return self._made(parent_inode, name, mode, ctx, rdev=rdev)

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        return self._made(parent_inode, name, (mode & 0o7777) | 0o040000, ctx)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        return self._made(parent_inode, name, 0o120777, ctx, target=target)

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attrs = self._made(parent_inode, name, (mode & 0o7777) | 0o100000, ctx)
        self.tree.opened_file(attrs.st_ino)
        return pyfuse3.FileInfo(fh=attrs.st_ino), attrs

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: Any) -> pyfuse3.EntryAttributes:
        self.tree.link(inode, new_parent_inode, new_name)
        return self.entry(inode, new_parent_inode)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.tree.unlink(parent_inode, name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.tree.rmdir(parent_inode, name)

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.tree.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # --- xattrs ---------------------------------------------------------------------------

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        try:
            return self.tree.xattr(inode, name)
        except Refusal:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    @boundary
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return [n for n, _v in self.tree.xattrs(inode)]

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.tree.set_xattr(inode, name, value)

    def setxattr_sync(self, inode: int, name: bytes, value: bytes, flags: int) -> int:
        """setxattr with its flags (through _fuseshim): 0 or -errno."""
        try:
            self.tree.set_xattr(inode, name, value, flags)
            return 0
        except Exception as e:
            return -self.errno_for(e, "setxattr", (inode, name))

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        try:
            self.tree.remove_xattr(inode, name)
        except Refusal:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    # --- files ----------------------------------------------------------------------------

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        a = self.tree.attrs(inode)
        if a.kind == F.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self.tree.open_truncating(inode)
        self.tree.opened_file(inode)
        return pyfuse3.FileInfo(fh=inode)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return self.tree.read(fh, off, size)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.tree.write(fh, off, buf)

    async def release(self, fh: int) -> None:
        try:
            self.tree.released_file(fh)
        except Exception as e:  # noqa: BLE001 - release has nobody to answer to
            log.error("%s: release(%d): %s", self.label, fh, e)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.tree.fsync(fh)

    def fallocate_sync(self, inode: int, mode: int, offset: int, length: int) -> int:
        """fallocate (through _fuseshim): 0 or -errno."""
        try:
            self.tree.fallocate(inode, mode, offset, length)
            return 0
        except Exception as e:
            return -self.errno_for(e, "fallocate", (inode, offset))
