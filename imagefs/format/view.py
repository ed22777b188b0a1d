"""A read-only view of one index: path lookup, directory listing, byte ranges of files.

Everything is read on demand: the root record, then only the records and packs on the
path asked for.  Reading bytes [a, b) of a file decompresses only the packs whose chunks
overlap [a, b).  Symlinks are resolved inside the image (absolute targets from the image's
root, ".." stopping at the root), so no lookup ever leaves the image.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from imagefs.errors import ChecksumMismatch, CorruptImage, NoSuchPath, NotADirectory, UsageError

from . import layout as F
from .commit_record import IndexEntry
from .container import ImageFile
from .packs import PackReader, Unpacked
from .records import Extent, Inode, MetaReader

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

    def kind_and_digest(self, ref: int) -> tuple[int, bytes]:
        return self.meta.kind_and_digest(ref)

    def child(self, directory: Inode, name: bytes) -> Inode | None:
        entries = directory.entries
        i = bisect.bisect_left(entries, (name,))
        if i < len(entries) and entries[i][0] == name:
            return self.meta.get(entries[i][2])
        return None

    def lookup(self, path: str | bytes, follow: bool = True) -> Inode:
        """The inode at path (symlinks followed inside the image; the last one only if
        follow).  A path given here may not hold ".." (see image_path_parts)."""
        parts = image_path_parts(path)
        bpath = b"/" + b"/".join(parts)
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

    def read(self, ino: Inode, offset: int, size: int) -> bytes | memoryview:
        """Bytes [offset, offset+size) of a regular file; holes read as zeros.  Each chunk's
        xxh3 is checked.  When the range lies in adjacent chunks of one pack, as a file's
        chunks usually do, the answer is a view into the cached pack: no copy."""
        end = min(ino.size, offset + size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        pos = offset
        run_pack = run_start = run_end = -1  # the last part, when it is a run in one pack
        for foff, pack, poff, length, xxh in overlapping(ino, offset, end):
            if foff > pos:
                parts.append(bytes(foff - pos))
                pos = foff
                run_pack = -1
            raw = self._checked(pack, poff, length, xxh)
            a = poff + pos - foff
            b = poff + min(end, foff + length) - foff
            if pack == run_pack and a == run_end:
                run_end = b  # the next chunk in the pack: widen the last part
                parts[-1] = memoryview(raw)[run_start:run_end]
            else:
                run_pack, run_start, run_end = pack, a, b
                parts.append(memoryview(raw)[a:b])
            pos = foff + b - poff
        if pos < end:
            parts.append(bytes(end - pos))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _checked(self, pack: int, poff: int, length: int, xxh: bytes) -> Unpacked:
        """PackReader.checked, its errors naming the index and the chunk."""
        try:
            return self.packs.checked(pack, poff, length, xxh)
        except CorruptImage as e:
            cause = "checksum mismatch" if isinstance(e, ChecksumMismatch) else e.detail()
            raise CorruptImage(self.image.path,
                               f"index {self.number}: chunk {xxh.hex()} (pack at {pack}, "
                               f"offset {poff}, {length} bytes): {cause}") from e

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


def image_path_parts(path: str | bytes) -> list[bytes]:
    """The names along a path inside an image, from its root ("" and "." dropped).

    ".." is refused by name rather than resolved: a caller builds paths outside the image
    from these names (extract writes DEST/etc/hostname for /etc/hostname), and a ".." there
    would climb out of DEST.  A NUL byte can name no file."""
    bpath = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    shown = _show(bpath.replace(b"\0", b"\\0"))
    if b"\0" in bpath:
        raise UsageError(f"{shown}: a path cannot hold a NUL byte")
    parts = [p for p in bpath.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise UsageError(f"{shown}: '..' is not allowed in a path inside the image "
                         "(paths start at the image's root)")
    return parts


def overlapping(ino: Inode, offset: int, end: int) -> Iterator[Extent]:
    """The extents of a file that overlap bytes [offset, end)."""
    extents = ino.extents
    i = max(bisect.bisect_right(extents, (offset, 1 << 64)) - 1, 0)
    for ext in extents[i:]:
        if ext[0] >= end:
            break
        if ext[0] + ext[3] > offset:
            yield ext


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")


def each_ref(views: Iterable[IndexView]) -> Iterator[tuple[IndexView, int, list[int]]]:
    """Every record reachable from the views' roots, each once, as (view, ref, pending):
    the caller adds the record's children to pending.  Subtrees the indices share are read
    once, and a crafted directory holding an ancestor ends the walk, not a loop.  A root
    that is not a directory is refused, as every reader refuses it."""
    seen: set[int] = set()
    for view in views:
        if view.entry.root in seen:  # an index with the root of one walked already
            continue
        stack = [view.root().ref]
        while stack:
            ref = stack.pop()
            if ref in seen:
                continue
            seen.add(ref)
            yield view, ref, stack
