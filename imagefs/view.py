"""A read-only view of one index: path lookup, directory listing, byte ranges of files.

Everything is read on demand: the root record, then only the records and packs on the
path asked for.  Reading bytes [a, b) of a file decompresses only the packs whose chunks
overlap [a, b).  Symlinks are resolved inside the image (absolute targets from the image's
root, ".." stopping at the root), so no lookup ever leaves the image.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from . import _format as F
from .container import ImageFile, IndexEntry
from .errors import CorruptImage, NoSuchPath, NotADirectory
from .packs import PackReader
from .records import Inode, MetaReader

MAX_SYMLINK_HOPS = 40
MAX_DEPTH = 4096


class IndexView:
    def __init__(self, image: ImageFile, number: int, entry: IndexEntry,
                 meta: MetaReader | None = None, packs: PackReader | None = None) -> None:
        self.image = image
        self.number = number
        self.entry = entry
        self.meta = meta or MetaReader(image)
        self.packs = packs or PackReader(image)

    def root(self) -> Inode:
        ino = self.meta.get(self.entry.root)
        if ino.kind != F.DIR:
            raise CorruptImage(self.image.path, f"index {self.number}: root is not a directory")
        return ino

    def get(self, ref: int) -> Inode:
        return self.meta.get(ref)

    def child(self, directory: Inode, name: bytes) -> Inode | None:
        entries = directory.entries
        i = bisect.bisect_left(entries, (name,))
        if i < len(entries) and entries[i][0] == name:
            return self.meta.get(entries[i][2])
        return None

    def lookup(self, path: str | bytes, follow: bool = True) -> Inode:
        """The inode at path (symlinks followed inside the image; the last one only if
        follow)."""
        bpath = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        parts = [p for p in bpath.split(b"/") if p and p != b"."]
        stack: list[Inode] = [self.root()]
        hops = 0
        while parts:
            name = parts.pop(0)
            cur = stack[-1]
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if cur.kind != F.DIR:
                raise NotADirectory(self.number, _show(bpath))
            nxt = self.child(cur, name)
            if nxt is None:
                raise NoSuchPath(self.number, _show(bpath))
            if nxt.kind == F.LNK and (parts or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise NoSuchPath(self.number, _show(bpath) + " (too many symlinks)")
                target = nxt.target
                if target.startswith(b"/"):
                    del stack[1:]
                parts = [p for p in target.split(b"/") if p and p != b"."] + parts
                continue
            stack.append(nxt)
            if len(stack) > MAX_DEPTH:
                raise CorruptImage(self.image.path, "directory tree too deep")
        return stack[-1]

    def read(self, ino: Inode, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of a regular file; holes read as zeros."""
        end = min(ino.size, offset + size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        extents = ino.extents
        i = max(bisect.bisect_right(extents, (offset, 1 << 64)) - 1, 0)
        for ext in extents[i:]:
            foff, pack, poff, length, xxh = ext
            if foff >= end:
                break
            if foff + length <= offset:
                continue
            data = self.packs.read_chunk(pack, poff, length, xxh)
            a = max(offset, foff)
            b = min(end, foff + length)
            out[a - offset:b - offset] = data[a - foff:b - foff]
        return bytes(out)

    def iter_data(self, ino: Inode) -> Iterator[tuple[int, bytes]]:
        """(file offset, bytes) of each data extent, in order."""
        for foff, pack, poff, length, xxh in ino.extents:
            yield foff, self.packs.read_chunk(pack, poff, length, xxh)

    def walk(self, top: Inode | None = None, prefix: bytes = b""
             ) -> Iterator[tuple[bytes, Inode]]:
        """(path, inode) for every entry under top, parents before children.  A directory
        reached twice (a crafted cycle) is an error, not a loop."""
        top = top or self.root()
        seen_dirs = {top.ref}
        yield prefix or b"/", top
        stack: list[tuple[bytes, Inode, int]] = [(prefix, top, 0)]
        while stack:
            path, d, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise CorruptImage(self.image.path, "directory tree too deep")
            subdirs = []
            for name, _kind, ref in d.entries:
                ino = self.meta.get(ref)
                p = path + b"/" + name
                yield p, ino
                if ino.kind == F.DIR:
                    if ref in seen_dirs:
                        raise CorruptImage(self.image.path,
                                           f"directory {_show(p)} appears twice (a cycle?)")
                    seen_dirs.add(ref)
                    subdirs.append((p, ino, depth + 1))
            stack.extend(reversed(subdirs))


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
