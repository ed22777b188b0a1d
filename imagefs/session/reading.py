"""What a writable mount reads, and the references the kernel holds: the base of SessionTree.

This is the part every request goes through (lookup, getattr, read, getxattr): an inode
the session changed is answered from its StagedInode, any other from the base index's
record, at no more cost than one dictionary lookup.  The kernel's lookup counts and open
files are kept here too, because they decide when an inode without a name is freed and
which directory an inode was reached through (changes.py marks directories dirty up it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from imagefs.format import layout as F
from imagefs.format.chunking import file_data
from imagefs.format.records import Inode
from imagefs.mount.tree import (
    BLOCK,
    DIR_SIZE,
    ROOT_INO,
    IndexTree,
    Refusal,
    data_regions,
    seek_regions,
)

from .ranges import Ranges
from .staging import NEW_INO_BASE, StagedInode, Staging

Attrs = StagedInode | Inode  # what attrs() returns: the mount reads both alike


@dataclass
class Counts:
    """The index's totals as commit records them (files: non-directory names)."""

    files: int
    dirs: int
    bytes: int


class TreeReading:
    """The session's state, its reads, and the kernel's references (see the module)."""

    def __init__(self, base: IndexTree, staging: Staging, nodes: dict[int, StagedInode],
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
        self.inline_bytes = sum(len(n.inline) for n in nodes.values() if n.inline is not None)

    def attrs(self, ino: int) -> Attrs:
        node = self.nodes.get(ino)
        return node if node is not None else self._record(ino)

    def _record(self, ino: int) -> Inode:
        """The base record of an inode the session never changed.  A number from
        NEW_INO_BASE up belongs to the session, never to a record: one without a
        StagedInode was removed and forgotten (or never handed out), so it is unknown, not
        an address of the image to decode (that would blame the image for it)."""
        if ino >= NEW_INO_BASE:
            raise Refusal(errno.ENOENT, "no such inode (removed in this session)")
        return self.base.inode(ino)

    def _base_inode(self, node: StagedInode) -> Inode:
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
        if not isinstance(a, StagedInode):
            return self.base.blocks(a)
        if a.kind == F.DIR:
            return DIR_SIZE // 512
        if a.kind != F.REG:
            return 0
        if a.inline is not None:
            return -(-len(a.inline) // BLOCK) * (BLOCK // 512)
        total = self.st.data_blocks(a.ino)
        if a.base is not None:
            for s, e in self._kept_base(a):
                total += (-(-e // BLOCK) - s // BLOCK) * (BLOCK // 512)
        return total

    def _kept_base(self, node: StagedInode) -> Iterator[tuple[int, int]]:
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

    def data_regions(self, node: StagedInode) -> list[tuple[int, int]]:
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

    # --- kernel references -------------------------------------------------------------

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
            del self.nodes[ino]
            self.st.node_gone(ino)

    # --- the filesystem ------------------------------------------------------------------

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.st.dir)

    def files_count(self) -> int:
        return self.counts.files + self.counts.dirs
