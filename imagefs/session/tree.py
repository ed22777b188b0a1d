"""The filesystem a writable mount serves: the base index with the session's changes on top.

An inode the session never changed is read from the base index, under the number a
read-only mount would give it (its record's address).  The first change to it copies its
attributes into a staging Node (never its content); the first write into a base file
copies only the chunks the write touches.  Inodes created in the session are numbered from
NEW_INO_BASE.  Numbers never change and are never reused, also across commits, so every
number the kernel holds stays valid; a number from NEW_INO_BASE up whose inode is gone is
unknown (ENOENT), never read as the address of a base record.

Commit (commit.py) must rewrite exactly the records that changed and the directories above
them.  So a change marks its inode dirty and every directory up to the root: the parent of
an inode is the directory the kernel reached it through (kernel lookups are exact-counted,
and dropped at forget), and an inode with several names has its parents found by one walk.

Every method either does what POSIX says or raises Refusal with the errno a local
filesystem would give; permissions are the kernel's (default_permissions).  Not
thread-safe: the FUSE loop calls it from one thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from imagefs.format import layout as F
from imagefs.format.chunking import file_data
from imagefs.format.records import Inode
from imagefs.format.view import overlapping
from imagefs.mount.tree import (
    BLOCK,
    DIR_SIZE,
    ROOT_INO,
    IndexTree,
    Refusal,
    data_regions,
    seek_regions,
)

from . import acl
from .staging import NEW_INO_BASE, Node, Ranges, Staging

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_FILE_SIZE = 1 << 62
INLINE_MAX = 64 * 1024  # a new file this small keeps its bytes in its staging row
INLINE_TOTAL = 64 << 20  # ... while all such bytes stay under this

Attrs = Node | Inode

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


KIND_OF_MODE = {stat.S_IFREG: F.REG, stat.S_IFDIR: F.DIR, stat.S_IFLNK: F.LNK,
                stat.S_IFCHR: F.CHR, stat.S_IFBLK: F.BLK, stat.S_IFIFO: F.FIFO,
                stat.S_IFSOCK: F.SOCK}


@dataclass
class Counts:
    """The index's totals as commit records them (files: non-directory names)."""

    files: int
    dirs: int
    bytes: int


class SessionTree:
    def __init__(self, base: IndexTree, staging: Staging, nodes: dict[int, Node],
                 counts: Counts, next_ino: int) -> None:
        self.base = base
        self.view = base.view
        self.st = staging
        self.nodes = nodes
        self.counts = counts
        self.next_ino = max(next_ino, NEW_INO_BASE)
        self.lookups: dict[int, int] = {}
        self.parents: dict[int, int] = {}
        self.opened: dict[int, int] = {}
        self.write_errors: dict[int, int] = {}  # ino -> errno of a failed write-behind
        self.inline_bytes = sum(len(n.inline) for n in nodes.values() if n.inline is not None)

    # --- reading ---------------------------------------------------------------------

    def attrs(self, ino: int) -> Attrs:
        node = self.nodes.get(ino)
        return node if node is not None else self._record(ino)

    def _record(self, ino: int) -> Inode:
        """The base record of an inode the session never changed.  A number from
        NEW_INO_BASE up belongs to the session, never to a record: one without a Node was
        removed and forgotten (or never handed out), so it is unknown, not an address of
        the image to decode (that would blame the image for it)."""
        if ino >= NEW_INO_BASE:
            raise Refusal(errno.ENOENT, "no such inode (removed in this session)")
        return self.base.inode(ino)

    def _base_inode(self, node: Node) -> Inode:
        assert node.base is not None
        return self.base.inode(node.ino)

    def lookup(self, parent: int, name: bytes) -> int | None:
        d = self.attrs(parent)
        if d.kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        if len(name) > 255:
            raise Refusal(errno.ENAMETOOLONG, "name too long")
        node = self.nodes.get(parent)
        if node is not None and node.entries is not None:
            return node.entries.get(name)
        hit = self.base.lookup(parent, name)
        return hit[0] if hit is not None else None

    def listing(self, ino: int) -> list[tuple[bytes, int]]:
        """A directory's (name, inode number) pairs in name order."""
        d = self.attrs(ino)
        if d.kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        node = self.nodes.get(ino)
        if node is not None and node.entries is not None:
            return sorted(node.entries.items())
        base = self._record(ino)
        return [(name, self.base.ino_of(ref)) for name, _k, ref in base.entries]

    def readlink(self, ino: int) -> bytes:
        a = self.attrs(ino)
        if a.kind != F.LNK:
            raise Refusal(errno.EINVAL, "not a symlink")
        return a.target

    def size(self, a: Attrs) -> int:
        return DIR_SIZE if a.kind == F.DIR else a.size

    def blocks(self, a: Attrs) -> int:
        if not isinstance(a, Node):
            return self.base.blocks(a)
        if a.kind == F.DIR:
            return DIR_SIZE // 512
        if a.kind != F.REG:
            return 0
        if a.inline is not None:
            return -(-len(a.inline) // BLOCK) * (BLOCK // 512)
        total = 0
        if self.st.has_data(a.ino):
            total += os.fstat(self.st.data_fd(a.ino)).st_blocks
        if a.base is not None:
            for s, e in self._kept_base(a):
                total += (-(-e // BLOCK) - s // BLOCK) * (BLOCK // 512)
        return total

    def _kept_base(self, node: Node) -> Iterator[tuple[int, int]]:
        """Data regions still shown from the base: below base_limit, not staged."""
        staged = node.staged or Ranges()
        for s, e in data_regions(self._base_inode(node)):
            e = min(e, node.base_limit)
            if s >= e:
                break
            yield from staged.gaps(s, e)

    def read(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        node = self.nodes.get(ino)
        if node is None:
            return self.view.read(self._record(ino), offset, size)
        end = min(node.size, offset + size)
        if offset >= end:
            return b""
        if node.inline is not None:
            return bytes(node.inline[offset:end])
        if node.is_new:
            return self._read_data(ino, offset, end)
        if node.staged is None and node.base_limit >= end:
            return self.view.read(self._base_inode(node), offset, end - offset)
        parts: list[bytes | memoryview] = []
        for s, e, staged in (node.staged or Ranges()).pieces(offset, end):
            if staged:
                parts.append(self._read_data(ino, s, e))
            elif s < node.base_limit:
                b = min(e, node.base_limit)
                parts.append(self.view.read(self._base_inode(node), s, b - s))
                parts.append(bytes(e - b))
            else:
                parts.append(bytes(e - s))
        return b"".join(parts)

    def _read_data(self, ino: int, start: int, end: int) -> bytes:
        if not self.st.has_data(ino):
            return bytes(end - start)
        data = os.pread(self.st.data_fd(ino), end - start, start)
        if len(data) < end - start:
            data += bytes(end - start - len(data))
        return data

    def seek(self, ino: int, offset: int, whence: int) -> int:
        node = self.nodes.get(ino)
        if node is None:
            self._record(ino)  # a session number: ENOENT
            return self.base.seek(ino, offset, whence)
        return seek_regions(self.data_regions(node), node.size, offset, whence)

    def data_regions(self, node: Node) -> list[tuple[int, int]]:
        """[start, end) of the file's data (not holes), in order, merged."""
        if node.inline is not None:
            return [(0, node.size)] if node.size else []
        regions = Ranges()
        if node.base is not None:
            for s, e in self._kept_base(node):
                regions.add(s, e)
        if self.st.has_data(node.ino):
            fd = self.st.data_fd(node.ino)
            spans = [(0, node.size)] if node.is_new else list(node.staged or Ranges())
            for a, b in spans:
                for s, e in file_data(fd, a, min(b, node.size)):
                    regions.add(s, e)
        return list(regions)

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        node = self.nodes.get(ino)
        if node is not None and node.xattrs is not None:
            return node.xattrs
        if node is not None and node.base is None:
            return []
        return self._record(ino).xattrs

    def xattr(self, ino: int, name: bytes) -> bytes:
        for n, v in self.xattrs(ino):
            if n == name:
                return v
        raise Refusal(errno.ENODATA, "no such attribute")

    # --- kernel bookkeeping ---------------------------------------------------------------

    def remember(self, ino: int, parent: int) -> None:
        """The kernel now holds one more reference to ino, reached through parent."""
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        if ino != ROOT_INO:
            self.parents[ino] = parent

    def forget(self, ino: int, count: int) -> None:
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return
        self.lookups.pop(ino, None)
        self.parents.pop(ino, None)
        self._maybe_free(ino)

    def opened_file(self, ino: int) -> None:
        self.opened[ino] = self.opened.get(ino, 0) + 1

    def released_file(self, ino: int) -> None:
        left = self.opened.get(ino, 0) - 1
        if left > 0:
            self.opened[ino] = left
            return
        self.opened.pop(ino, None)
        self.st.release_fd(ino)
        self._maybe_free(ino)

    def _maybe_free(self, ino: int) -> None:
        node = self.nodes.get(ino)
        if node is not None and node.nlink == 0 and ino not in self.opened \
                and ino not in self.lookups:
            if node.inline is not None:
                self.inline_bytes -= len(node.inline)
            self.write_errors.pop(ino, None)
            del self.nodes[ino]
            self.st.node_gone(ino)

    # --- change bookkeeping ---------------------------------------------------------------

    def _own(self, ino: int) -> Node:
        """The staging Node of ino, copying the base's attributes (only) on first change."""
        node = self.nodes.get(ino)
        if node is not None:
            return node
        b = self._record(ino)
        node = Node(ino, b.ref, b.kind, b.mode, b.uid, b.gid, b.nlink, b.size, b.rdev,
                    b.mtime_ns, b.atime_ns, b.ctime_ns, target=b.target,
                    base_limit=b.size if b.kind == F.REG else 0,
                    parent=self.parents.get(ino, 0), dirty=False)
        self.nodes[ino] = node
        return node

    def _changed(self, node: Node) -> None:
        """node's record must be rewritten: so must every directory above it."""
        self.st.node_changed(node)
        if node.dirty:
            return  # its directories were marked when it first became dirty
        node.dirty = True
        if node.ino == ROOT_INO or node.nlink == 0:
            return
        for parent in self._parents_of(node):
            self._dirty_up(parent)

    def _dirty_up(self, ino: int) -> None:
        while ino:
            d = self._own(ino)
            if d.dirty:
                return
            d.dirty = True
            self.st.node_changed(d)
            if ino == ROOT_INO:
                return
            ino = d.parent or self.parents.get(ino, 0) or next(
                iter(self._find_parents(ino)), 0)

    def _parents_of(self, node: Node) -> list[int]:
        multi = node.kind != F.DIR and (node.nlink > 1 or (
            node.base is not None and self._base_inode(node).nlink > 1))
        parent = node.parent or self.parents.get(node.ino, 0)
        if parent and not multi:
            return [parent]
        return self._find_parents(node.ino)

    def _find_parents(self, ino: int) -> list[int]:
        """Every directory naming ino, by a walk of the whole tree (hardlinks only)."""
        found = []
        stack = [ROOT_INO]
        while stack:
            d = stack.pop()
            for _name, child in self.listing(d):
                if child == ino:
                    found.append(d)
                a = self.attrs(child)
                if a.kind == F.DIR:
                    self.parents.setdefault(child, d)
                    node = self.nodes.get(child)
                    if node is not None and not node.parent:
                        node.parent = d
                    stack.append(child)
        return found

    def _dir_for_change(self, ino: int) -> Node:
        """A directory about to gain or lose entries: its listing copied into staging."""
        d = self._own(ino)
        if d.kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        if d.entries is None:
            d.entries = {}
            if d.base is not None:
                for name, _k, ref in self.base.inode(ino).entries:
                    child = self.base.ino_of(ref)
                    d.entries[name] = child
                    self.st.entry_set(ino, name, child)
        return d

    def _set_entry(self, d: Node, name: bytes, child: int | None) -> None:
        assert d.entries is not None
        if child is None:
            del d.entries[name]
        else:
            d.entries[name] = child
        self.st.entry_set(d.ino, name, child)
        now = time.time_ns()
        d.mtime_ns = d.ctime_ns = now
        self._changed(d)

    def _count_size(self, node: Node, old_size: int) -> None:
        if node.kind == F.REG and node.nlink > 0 and node.size != old_size:
            self.counts.bytes += node.size - old_size
            self.st.meta_set("counts", vars(self.counts))

    def _count(self, files: int = 0, dirs: int = 0, nbytes: int = 0) -> None:
        self.counts.files += files
        self.counts.dirs += dirs
        self.counts.bytes += nbytes
        self.st.meta_set("counts", vars(self.counts))

    # --- creating and removing names ------------------------------------------------------

    def _check_new_name(self, parent: int, name: bytes) -> Node:
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
             target: bytes = b"", umask: int = 0) -> Node:
        """mknod, mkdir, symlink and create: a new inode named name in parent.  Its mode is
        masked by umask, or by the parent's default ACL, which it inherits (acl.py)."""
        kind = KIND_OF_MODE.get(stat.S_IFMT(mode))
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
        node = Node(ino, None, kind, mode, uid, gid, 2 if kind == F.DIR else 1,
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

    def link(self, ino: int, parent: int, name: bytes) -> Node:
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

    def _drop_dir(self, parent: Node, ino: int) -> None:
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

    # --- attributes -------------------------------------------------------------------

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Node:
        node = self._own(ino)
        if size is not None:
            if node.kind == F.DIR:
                raise Refusal(errno.EISDIR, "is a directory")
            if node.kind != F.REG:
                raise Refusal(errno.EINVAL, "not a regular file")
            self.truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            access = dict(self.xattrs(ino)).get(acl.ACCESS)
            if access is not None:  # the ACL's owner, group class and other follow
                node.xattrs = sorted([(n, v) for n, v in self.xattrs(ino) if n != acl.ACCESS]
                                     + [(acl.ACCESS, acl.chmod(access, node.mode))])
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = ctime_ns if ctime_ns is not None else time.time_ns()
        self._changed(node)
        return node

    def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not 0 < len(name) <= 255:
            raise Refusal(errno.ERANGE, "attribute name length")
        if len(value) > F.MAX_XATTR_VALUE:
            raise Refusal(errno.E2BIG, "attribute value too large")
        current = list(self.xattrs(ino))
        names = [n for n, _v in current]
        if flags & XATTR_CREATE and name in names:
            raise Refusal(errno.EEXIST, "attribute exists")
        if flags & XATTR_REPLACE and name not in names:
            raise Refusal(errno.ENODATA, "no such attribute")
        node = self._own(ino)
        keep = True
        if name == acl.DEFAULT and node.kind != F.DIR:
            raise Refusal(errno.EACCES, "a default ACL belongs to a directory")
        if name == acl.ACCESS:
            entries = acl.decode(value)
            if entries is None:
                raise Refusal(errno.EINVAL, "not a POSIX ACL")
            node.mode, equivalent = acl.mode_of(entries, node.mode)
            keep = not equivalent  # the mode says it all: no ACL is stored (as ext4)
        node.xattrs = sorted([(n, v) for n, v in current if n != name]
                             + ([(name, value)] if keep else []))
        node.ctime_ns = time.time_ns()
        self._changed(node)

    def remove_xattr(self, ino: int, name: bytes) -> None:
        current = self.xattrs(ino)
        if all(n != name for n, _v in current):
            raise Refusal(errno.ENODATA, "no such attribute")
        node = self._own(ino)
        node.xattrs = [(n, v) for n, v in current if n != name]
        node.ctime_ns = time.time_ns()
        self._changed(node)

    # --- file content ---------------------------------------------------------------------

    def file_for_change(self, ino: int) -> Node:
        node = self._own(ino)
        if node.kind != F.REG:
            raise Refusal(errno.EISDIR if node.kind == F.DIR else errno.EINVAL,
                          "not a regular file")
        return node

    def _copy_up(self, node: Node, start: int, end: int) -> None:
        """Before [start, end) of a base file changes: copy the base chunks it touches
        (the parts of them outside [start, end)) into the data file, and stage them."""
        if node.is_new or start >= node.base_limit:
            return
        if node.staged is None:
            node.staged = Ranges()
        staged = node.staged
        base = self._base_inode(node)
        fd = self.st.data_fd(node.ino)
        lo, hi = start, end
        for foff, _p, _o, length, _x in overlapping(base, start, min(end, node.base_limit)):
            c0, c1 = foff, min(foff + length, node.base_limit)
            for g0, g1 in staged.gaps(c0, c1):
                for a, b in ((g0, min(g1, start)), (max(g0, end), g1)):
                    if a < b:
                        _pwrite_all(fd, bytes(self.view.read(base, a, b - a)), a)
            lo, hi = min(lo, c0), max(hi, c1)
        staged.add(lo, hi)
        self.st.wrote(node.ino)

    def write(self, ino: int, offset: int, data: bytes) -> int:
        self._check_write_error(ino)
        if offset + len(data) > MAX_FILE_SIZE:
            raise Refusal(errno.EFBIG, "file too large")
        node = self.file_for_change(ino)
        end = offset + len(data)
        if node.inline is not None and not self._fits_inline(node, max(end, node.size)):
            self._spill(node)
        if node.inline is not None:
            self._resize_inline(node, max(end, len(node.inline)))
            node.inline[offset:end] = data
        else:
            self._copy_up(node, offset, end)
            _pwrite_all(self.st.data_fd(ino), data, offset)
        self._wrote(node, offset, end)
        return len(data)

    def write_target(self, ino: int, offset: int, size: int) -> tuple[int, int] | None:
        """For a caller that writes a write's bytes itself, after answering it (write-behind,
        _fuseshim): (data file descriptor, offset), the bookkeeping done as if they were
        written.  None: write() must do it, before the answer (inline bytes, or a staging
        disk nearly full, where ENOSPC must reach this very write)."""
        self._check_write_error(ino)
        if offset + size > MAX_FILE_SIZE:
            raise Refusal(errno.EFBIG, "file too large")
        node = self.file_for_change(ino)
        if node.inline is not None or not self.st.room_for(size):
            return None
        self._copy_up(node, offset, offset + size)
        fd = self.st.data_fd(ino)
        self._wrote(node, offset, offset + size)
        return fd, offset

    def write_failed(self, ino: int, err: int) -> None:
        """A write answered before its bytes were written failed (write-behind): the file's
        next write, flush or fsync reports it, as a local filesystem reports a failed
        writeback."""
        if ino in self.nodes:
            self.write_errors[ino] = err

    def _check_write_error(self, ino: int) -> None:
        err = self.write_errors.pop(ino, None) if self.write_errors else None
        if err is not None:
            raise Refusal(err, "an earlier write failed")

    def flush(self, ino: int) -> int:
        """A close: 0, or the error of a write that failed after it was answered."""
        self._check_write_error(ino)
        return 0

    def _wrote(self, node: Node, offset: int, end: int) -> None:
        """Bookkeeping of bytes written at [offset, end)."""
        if node.inline is None:
            self.st.wrote(node.ino)
        if not node.is_new:
            assert node.staged is not None or offset >= node.base_limit
            if node.staged is None:
                node.staged = Ranges()
            node.staged.add(offset, end)
        old = node.size
        node.size = max(node.size, end)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self._count_size(node, old)
        self._changed(node)

    def _fits_inline(self, node: Node, size: int) -> bool:
        assert node.inline is not None
        return size <= INLINE_MAX and self.inline_bytes + size - len(node.inline) \
            <= INLINE_TOTAL

    def _resize_inline(self, node: Node, size: int) -> None:
        assert node.inline is not None
        self.inline_bytes += size - len(node.inline)
        if size > len(node.inline):
            node.inline.extend(bytes(size - len(node.inline)))
        else:
            del node.inline[size:]

    def _spill(self, node: Node) -> None:
        """A new file outgrew its inline bytes: they move into a data file."""
        assert node.inline is not None
        fd = self.st.data_fd(node.ino)
        os.ftruncate(fd, 0)
        _pwrite_all(fd, node.inline, 0)
        self.st.wrote(node.ino)
        self.inline_bytes -= len(node.inline)
        node.inline = None

    def truncate(self, node: Node, size: int) -> None:
        if size < 0 or size > MAX_FILE_SIZE:
            raise Refusal(errno.EINVAL if size < 0 else errno.EFBIG, "size")
        if node.inline is not None:
            if self._fits_inline(node, size):
                self._resize_inline(node, size)
            else:
                self._spill(node)
        old = node.size
        if size < old:
            if self.st.has_data(node.ino):
                os.ftruncate(self.st.data_fd(node.ino), size)
                self.st.wrote(node.ino)
            if node.staged is not None:
                node.staged.cut(size)
            node.base_limit = min(node.base_limit, size)
        node.size = size
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self._count_size(node, old)
        self._changed(node)

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise Refusal(errno.EINVAL, "offset or length")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise Refusal(errno.EOPNOTSUPP, "fallocate mode")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise Refusal(errno.EINVAL, "punching a hole needs KEEP_SIZE")
        node = self.file_for_change(ino)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise Refusal(errno.EFBIG, "file too large")
        if node.inline is not None and not (mode & FALLOC_FL_KEEP_SIZE) \
                and not self._fits_inline(node, max(end, node.size)):
            self._spill(node)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            zero_end = min(end, node.size)
            if node.inline is not None:
                if offset < zero_end:
                    node.inline[offset:zero_end] = bytes(zero_end - offset)
            elif offset < zero_end:
                self._copy_up(node, offset, zero_end)
                fd = self.st.data_fd(ino)
                _punch(fd, offset, zero_end - offset)
                self.st.wrote(ino)
                if not node.is_new:
                    if node.staged is None:
                        node.staged = Ranges()
                    node.staged.add(offset, zero_end)
            node.mtime_ns = node.ctime_ns = time.time_ns()
        if not mode & FALLOC_FL_KEEP_SIZE and end > node.size:
            old = node.size
            if node.inline is not None:
                self._resize_inline(node, end)
            node.size = end
            node.ctime_ns = time.time_ns()
            self._count_size(node, old)
        self._changed(node)

    def open_truncating(self, ino: int) -> None:
        node = self.file_for_change(ino)
        if node.size:
            self.truncate(node, 0)

    def fsync(self, ino: int | None = None) -> None:
        self.st.sync(durable=True)
        if ino is not None:
            self._check_write_error(ino)

    # --- filesystem -------------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.st.dir)

    def files_count(self) -> int:
        return self.counts.files + self.counts.dirs


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
