"""The filesystem a mount serves, without FUSE: inode numbers, attributes, lookups,
directory listings, byte ranges, holes and xattrs of one index.

An inode number is the address of the inode's record (see records.py), so any number the
kernel holds can be answered by reading that record again: nothing is kept per lookup, and
forgetting costs nothing.  The root's record is shown as inode 1 (FUSE's root).  Decoded
records are kept in a bounded LRU (weighed by their extents and entries), on top of the
metadata block cache, so an open 1 GiB file is not decoded again for every read.

The FUSE adapter (fuse.py) only translates requests into calls here (file bytes come from
IndexView.read); tests call this directly.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from imagefs.errors import CorruptImage
from imagefs.format import layout as F
from imagefs.format.lru import WeightedLRU
from imagefs.format.records import Inode
from imagefs.format.view import IndexView

ROOT_INO = 1
BLOCK = 4096  # the allocation unit st_blocks is reckoned in (as ext4 and tmpfs do)
DIR_SIZE = 4096  # directories report one block: their size is the filesystem's, not data


class Refusal(OSError):
    """An answer the filesystem gives on purpose (ENOTDIR, ENXIO...), not a failure."""


@dataclass(frozen=True)
class Usage:
    """What statfs reports: the image's size and the index's counts."""

    blocks: int
    files: int
    name_max: int = 255
    block_size: int = BLOCK


class IndexTree:
    """One index as inodes; thread-safe (the FUSE loop reads packs inline, in its own
    thread, while a damage report looks the inode's path up in a worker thread)."""

    def __init__(self, view: IndexView, inode_cache_weight: int = 200_000) -> None:
        self.view = view
        self.root_ref = view.root().ref
        self._cache: WeightedLRU[int, Inode] = WeightedLRU(inode_cache_weight, _weight)

    # --- numbering ---------------------------------------------------------------------

    def ino_of(self, ref: int) -> int:
        return ROOT_INO if ref == self.root_ref else ref

    def ref_of(self, ino: int) -> int:
        return self.root_ref if ino == ROOT_INO else ino

    # --- records -----------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        ref = self.ref_of(ino)
        node = self._cache.get(ref)
        if node is None:
            node = self.view.get(ref)
            self._cache.put(ref, node)
        return node

    def lookup(self, parent: int, name: bytes) -> tuple[int, Inode] | None:
        d = self.inode(parent)
        if d.kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        entries = d.entries
        i = bisect.bisect_left(entries, (name,))
        if i < len(entries) and entries[i][0] == name:
            ref = entries[i][2]
            return self.ino_of(ref), self.inode(ref)
        return None

    def entries(self, ino: int, start: int = 0) -> Iterator[tuple[bytes, int, Inode, int]]:
        """(name, inode number, inode, next start) of a directory's entries from start."""
        d = self.inode(ino)
        if d.kind != F.DIR:
            raise Refusal(errno.ENOTDIR, "not a directory")
        for i in range(start, len(d.entries)):
            name, _kind, ref = d.entries[i]
            yield name, self.ino_of(ref), self.inode(ref), i + 1

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if node.kind != F.LNK:
            raise Refusal(errno.EINVAL, "not a symlink")
        return node.target

    # --- attributes --------------------------------------------------------------------

    @staticmethod
    def size(node: Inode) -> int:
        return DIR_SIZE if node.kind == F.DIR else node.size

    @staticmethod
    def blocks(node: Inode) -> int:
        """st_blocks (512-byte units) of the file's data regions, each rounded out to 4 KiB
        blocks: what the filesystem it was captured from reported for it."""
        if node.kind == F.DIR:
            return DIR_SIZE // 512
        if node.kind == F.LNK:
            return 0
        total = 0
        end = -1
        for start, stop in data_regions(node):
            a = start - start % BLOCK
            b = -(-stop // BLOCK) * BLOCK
            if a < end:
                a = end
            if b > a:
                total += b - a
                end = b
        return total // 512

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        for n, v in self.inode(ino).xattrs:
            if n == name:
                return v
        return None

    def xattr_names(self, ino: int) -> list[bytes]:
        return [n for n, _v in self.inode(ino).xattrs]

    def usage(self) -> Usage:
        return Usage(blocks=-(-self.view.image.size() // BLOCK),
                     files=self.view.entry.files + self.view.entry.dirs)

    # --- data --------------------------------------------------------------------------

    def seek(self, ino: int, offset: int, whence: int) -> int:
        """lseek's SEEK_DATA and SEEK_HOLE over the file's stored data regions."""
        node = self.inode(ino)
        return seek_regions(data_regions(node), node.size, offset, whence)

    def path_of(self, ino: int, limit: int = 5_000_000) -> bytes | None:
        """The first path that names inode ino (for log lines; walks the tree)."""
        ref = self.ref_of(ino)
        if ref == self.root_ref:
            return b"/"
        try:
            for n, (path, node) in enumerate(self.view.walk()):
                if node.ref == ref:
                    return path
                if n >= limit:
                    break
        except CorruptImage:
            pass
        return None


def seek_regions(regions: Iterable[tuple[int, int]], size: int, offset: int,
                 whence: int) -> int:
    """SEEK_DATA / SEEK_HOLE over a file's data regions ([start, stop), in order)."""
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise Refusal(errno.EINVAL, "whence")
    if offset < 0:
        raise Refusal(errno.EINVAL, "negative offset")
    if offset >= size:
        raise Refusal(errno.ENXIO, "past the end")
    for start, stop in regions:
        if stop <= offset:
            continue
        if whence == os.SEEK_DATA:
            return max(start, offset)
        return offset if start > offset else min(stop, size)
    if whence == os.SEEK_DATA:
        raise Refusal(errno.ENXIO, "no data past offset")
    return offset


def data_regions(node: Inode) -> Iterator[tuple[int, int]]:
    """[start, stop) of each run of adjacent extents: the file's data, between holes."""
    start = stop = -1
    for foff, _p, _o, length, _x in node.extents:
        if foff != stop:
            if stop > start:
                yield start, stop
            start = foff
        stop = foff + length
    if stop > start:
        yield start, stop


def _weight(node: Inode) -> int:
    return 1 + len(node.extents) + len(node.entries) + len(node.xattrs)

