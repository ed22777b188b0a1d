"""The names of a writable mount: mknod, mkdir, symlink, create, link, unlink, rmdir and
rename (with RENAME_NOREPLACE and RENAME_EXCHANGE), each as POSIX says or a Refusal with
the errno a local filesystem would give.  Apart from file content and attributes because
these are the changes that move inodes between directories and free them.
"""

from __future__ import annotations

import errno
import stat
import time

from imagefs.format import layout as F
from imagefs.mount.tree import ROOT_INO, Refusal

from . import acl
from .changes import TreeChanges
from .staging import StagedInode

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class Namespace(TreeChanges):
    """Creating, linking, removing and renaming names."""

    def _check_new_name(self, parent: int, name: bytes) -> StagedInode:
        if len(name) > 255:
            raise Refusal(errno.ENAMETOOLONG, "name too long")
        d = self._dir_for_change(parent)
        assert d.entries is not None
        if name in d.entries:
            raise Refusal(errno.EEXIST, "exists")
        if d.nlink == 0:
            raise Refusal(errno.ENOENT, "directory was removed")
        return d

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
             target: bytes = b"", umask: int = 0) -> StagedInode:
        """mknod, mkdir, symlink and create: a new inode named name in parent.  Its mode is
        masked by umask, or by the parent's default ACL, which it inherits (acl.py)."""
        kind = F.KIND_OF_MODE.get(stat.S_IFMT(mode))
        if kind is None:
            raise Refusal(errno.EINVAL, "unknown file type")
        if kind == F.LNK and not 0 < len(target) <= F.MAX_SYMLINK:
            raise Refusal(errno.ENAMETOOLONG if target else errno.ENOENT, "symlink target")
        d = self._check_new_name(parent, name)
        xattrs: list[tuple[bytes, bytes]] = []
        default = dict(self.xattrs(parent)).get(acl.DEFAULT)
        if kind == F.LNK:
            pass
        elif default is not None:
            mode, access = acl.inherit(default, mode)
            if access is not None:
                xattrs.append((acl.ACCESS, access))
            if kind == F.DIR:
                xattrs.append((acl.DEFAULT, default))
        else:
            mode &= ~umask
        now = time.time_ns()
        ino = self.next_ino
        self.next_ino += 1
        self.st.meta_set("next_ino", self.next_ino)
        node = StagedInode(ino, None, kind, mode, uid, gid, 2 if kind == F.DIR else 1,
                           len(target) if kind == F.LNK else 0,
                           rdev if kind in (F.CHR, F.BLK) else 0, now, now, now, target=target,
                           xattrs=sorted(xattrs), entries={} if kind == F.DIR else None,
                           parent=parent, inline=bytearray() if kind == F.REG else None)
        self.nodes[ino] = node
        self._changed(node)
        self._set_entry(d, name, ino)
        if kind == F.DIR:
            d.nlink += 1
            self._count(dirs=1)
        else:
            self._count(files=1)
        return node

    def link(self, ino: int, parent: int, name: bytes) -> StagedInode:
        node = self._own(ino)
        if node.kind == F.DIR:
            raise Refusal(errno.EPERM, "hard link to a directory")
        if node.nlink == 0:
            raise Refusal(errno.ENOENT, "file was removed")
        d = self._check_new_name(parent, name)
        self._changed(node)  # before nlink grows: its present parents are marked
        node.nlink += 1
        node.ctime_ns = time.time_ns()
        self._set_entry(d, name, ino)
        self._count(files=1)
        return node

    def unlink(self, parent: int, name: bytes) -> None:
        ino = self.lookup(parent, name)
        if ino is None:
            raise Refusal(errno.ENOENT, "no such file")
        if self.attrs(ino).kind == F.DIR:
            raise Refusal(errno.EISDIR, "is a directory")
        d = self._dir_for_change(parent)
        self._set_entry(d, name, None)
        self._drop_name(ino)

    def _drop_name(self, ino: int) -> None:
        node = self._own(ino)
        self._changed(node)
        node.nlink -= 1
        node.ctime_ns = time.time_ns()
        self._count(files=-1, nbytes=-node.size if node.nlink == 0 and node.kind == F.REG
                    else 0)
        if node.nlink == 0:
            self._maybe_free(ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        ino = self.lookup(parent, name)
        if ino is None:
            raise Refusal(errno.ENOENT, "no such directory")
        if self.attrs(ino).kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        if self.listing(ino):
            raise Refusal(errno.ENOTEMPTY, "directory not empty")
        d = self._dir_for_change(parent)
        self._set_entry(d, name, None)
        self._drop_dir(d, ino)

    def _drop_dir(self, parent: StagedInode, ino: int) -> None:
        node = self._own(ino)
        node.nlink = 0
        node.ctime_ns = time.time_ns()
        self.st.node_changed(node)
        parent.nlink -= 1
        self._count(dirs=-1)
        self._maybe_free(ino)

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise Refusal(errno.EINVAL, "rename flags")
        src = self.lookup(p1, n1)
        if src is None:
            raise Refusal(errno.ENOENT, "no such file")
        if len(n2) > 255:
            raise Refusal(errno.ENAMETOOLONG, "name too long")
        dst = self.lookup(p2, n2)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise Refusal(errno.EEXIST, "exists")
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise Refusal(errno.ENOENT, "no such file")
            self._exchange(p1, n1, src, p2, n2, dst)
            return
        if dst == src:
            return  # two names of one inode: nothing to do (POSIX)
        s_dir = self.attrs(src).kind == F.DIR
        if dst is not None:
            d_dir = self.attrs(dst).kind == F.DIR
            if s_dir and not d_dir:
                raise Refusal(errno.ENOTDIR, "not a directory")
            if d_dir and not s_dir:
                raise Refusal(errno.EISDIR, "is a directory")
            if d_dir and self.listing(dst):
                raise Refusal(errno.ENOTEMPTY, "directory not empty")
        if s_dir:
            self._check_not_inside(src, p2)
        d1 = self._dir_for_change(p1)
        d2 = self._dir_for_change(p2)
        node = self._own(src)
        self._changed(node)
        if dst is not None:
            self._set_entry(d2, n2, None)
            if self.attrs(dst).kind == F.DIR:
                self._drop_dir(d2, dst)
            else:
                self._drop_name(dst)
        self._set_entry(d1, n1, None)
        self._set_entry(d2, n2, src)
        node.ctime_ns = time.time_ns()
        if not (node.nlink > 1 and node.kind != F.DIR):
            node.parent = p2
            self.parents[src] = p2
        if s_dir and p1 != p2:
            d1.nlink -= 1
            d2.nlink += 1

    def _exchange(self, p1: int, n1: bytes, a: int, p2: int, n2: bytes, b: int) -> None:
        a_dir = self.attrs(a).kind == F.DIR
        b_dir = self.attrs(b).kind == F.DIR
        if a_dir:
            self._check_not_inside(a, p2)
        if b_dir:
            self._check_not_inside(b, p1)
        d1 = self._dir_for_change(p1)
        d2 = self._dir_for_change(p2)
        na, nb = self._own(a), self._own(b)
        self._changed(na)
        self._changed(nb)
        self._set_entry(d1, n1, b)
        self._set_entry(d2, n2, a)
        now = time.time_ns()
        na.ctime_ns = nb.ctime_ns = now
        for node, parent in ((na, p2), (nb, p1)):
            if not (node.nlink > 1 and node.kind != F.DIR):
                node.parent = parent
                self.parents[node.ino] = parent
        if a_dir != b_dir and p1 != p2:
            moved = 1 if a_dir else -1  # a directory went from p1 to p2 (or back)
            d1.nlink -= moved
            d2.nlink += moved

    def _check_not_inside(self, directory: int, target_parent: int) -> None:
        """A directory cannot move below itself (the kernel checks too; this is cheap)."""
        ino = target_parent
        while ino and ino != ROOT_INO:
            if ino == directory:
                raise Refusal(errno.EINVAL, "a directory cannot move into itself")
            node = self.nodes.get(ino)
            ino = (node.parent if node is not None and node.parent else 0) \
                or self.parents.get(ino, 0)
