"""Moving indices' records into another image file (export, optimize).

A record moves as it is but for where things are: a file's extents name its chunks' new
places, a directory's entries its children's new refs.  Two walks, both streaming:

* `used_chunks` reads every record once to learn which chunks the indices use, looking
  into a plain file's extents without building objects (most records are files); the
  compact profile, which orders content by file, walks with `named_files` instead;
* `RecordMover` writes the records: a directory's files as the directory is reached, the
  directories children first at the end of each index (as `writer.write_tree` lays them
  out, so directories sit together).  Memory holds the directories of one index and a map
  of the refs already moved, never a tree of objects, whatever the index's size.

Each record is decoded (so checked) on its way, and its node digest recomputed from the
SHA-256s of the chunks the destination holds: an index whose records do not add up to its
digest is refused by the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from imagefs.errors import CorruptImage

from . import layout as F
from .digest import plain_file_digest, record_attrs
from .packs import ChunkLoc
from .records import MAX_FILE_SIZE, Extent, Inode, MetaReader, MetaWriter, decode_inode
from .view import IndexView, each_ref
from .writer import TreeStats, finish_directory, finish_leaf

ChunkUse = tuple[int, int, bytes]  # offset in pack, length, xxh3-128: one chunk a file uses
ChunkKey = tuple[int, int, int, bytes]  # the same with its source pack first


def used_chunks(views: Iterable[IndexView],
                directories: dict[int, Inode] | None = None) -> dict[int, set[ChunkUse]]:
    """The chunks the views' files use: source pack -> {(offset, length, xxh3-128)}.  Each
    record is read once, also when indices share subtrees (or, crafted, when a directory
    holds an ancestor).  The directories read are kept in `directories` (source ref ->
    record), for RecordMover to read them once."""
    used: dict[int, set[ChunkUse]] = {}
    for view, ref, pending in each_ref(views):
        raw, start, end = view.meta.record_bytes(ref)
        extents = _plain_extents(raw, start, end)
        if extents is None:
            ino = decode_inode(raw[start:end], f"{view.image.path}: record {ref:#x}")
            ino.ref = ref
            extents = ino.extents
            if ino.kind == F.DIR:
                pending.extend(child for _n, _k, child in ino.entries)
                if directories is not None:
                    directories[ref] = ino
        for _foff, pack, poff, length, xxh in extents:
            used.setdefault(pack, set()).add((poff, length, xxh))
    return used


def named_files(views: Iterable[IndexView], directories: dict[int, Inode] | None = None
                ) -> list[tuple[bytes, list[ChunkKey], bool]]:
    """Every regular file of the views, once: the name it was first reached by, the chunks
    of its extents in order, and whether the first one starts the file: what ordering
    content by kind needs (the compact profile; content_class).  The directories read are
    kept in `directories`, as used_chunks keeps them."""
    files = []
    seen: set[int] = set()
    for view in views:
        if view.entry.root in seen:
            continue
        stack = [view.root().ref]
        seen.add(stack[0])
        while stack:
            node = view.get(stack.pop())
            if directories is not None:
                directories[node.ref] = node
            for name, _kind, ref in node.entries:
                if ref in seen:
                    continue
                seen.add(ref)
                child = view.get(ref)
                if child.kind == F.DIR:
                    stack.append(ref)
                elif child.kind == F.REG:
                    keys = [(pack, poff, length, xxh)
                            for _f, pack, poff, length, xxh in child.extents]
                    # a file that starts with a hole starts with zeros, not its first chunk
                    starts = bool(child.extents) and child.extents[0][0] == 0
                    files.append((name, keys, starts))
    return files


def _plain_extents(raw: bytes, start: int, end: int) -> list[Extent] | None:
    """The extents of the record at raw[start:end] if it is a regular file without xattrs
    whose extents fill it (most records), read without decoding the rest; else None (a
    caller decodes it, and decode_inode names any fault)."""
    head = start + F.INODE.size
    if end - head < 4 or raw[start] != F.REG or raw[start + 2:start + 4] != b"\0\0":
        return None
    body = raw[head + 4:end]
    if int.from_bytes(raw[head:head + 4], "little") * F.EXTENT.size != len(body):
        return None
    return list(F.EXTENT.iter_unpack(body))


@dataclass(slots=True)
class _Moved:
    """A non-directory already written: its new ref, kind, size and digest."""

    ref: int
    kind: int
    size: int
    digest: bytes


class RecordMover:
    """Writes indices' records into out_meta, their chunks found in moved (source pack,
    offset, length, xxh3-128 -> new place).  Records several indices share (hard links,
    files a commit left alone) are written once; progress(bytes) after each file."""

    def __init__(self, out_meta: MetaWriter, moved: dict[ChunkKey, ChunkLoc],
                 progress: Callable[[int], None] | None = None,
                 directories: dict[int, Inode] | None = None) -> None:
        self.meta = out_meta
        self.moved = moved
        self.progress = progress
        self._dirs = directories or {}  # source ref -> record, as used_chunks read them
        self._leaves: dict[int, _Moved] = {}  # source ref -> written non-directory

    def move(self, view: IndexView) -> TreeStats:
        """Write the index's records; what to put in its entry (digest recomputed)."""
        where = view.image.path
        root = self._dirs.get(view.entry.root) or view.root()
        order: list[Inode] = []  # the index's directories, pre-order, each once
        dirs_seen = {root.ref}
        counted: set[int] = set()  # files whose bytes this index has counted
        files = nbytes = 0
        stack = [root]
        while stack:
            node = stack.pop()
            order.append(node)
            for _name, _kind, ref in node.entries:
                leaf = self._leaves.get(ref)
                if leaf is None:
                    if ref in dirs_seen:
                        raise CorruptImage(where, "a directory appears twice in the tree")
                    found = self._move_child(view, ref, where)
                    if isinstance(found, Inode):
                        dirs_seen.add(ref)
                        stack.append(found)
                        continue
                    leaf = self._leaves[ref] = found
                files += 1
                if ref not in counted:
                    counted.add(ref)
                    if leaf.kind == F.REG:
                        nbytes += leaf.size
                        if self.progress:
                            self.progress(leaf.size)
        written: dict[int, tuple[int, bytes]] = {}  # directory: source ref -> new, digest
        for node in reversed(order):  # every subdirectory comes after its parent in order
            entries, digests = [], []
            for name, _kind, ref in node.entries:
                leaf = self._leaves.get(ref)
                if leaf is not None:
                    entries.append((name, leaf.kind, leaf.ref))
                    digests.append(leaf.digest)
                else:
                    new, digest = written[ref]
                    entries.append((name, F.DIR, new))
                    digests.append(digest)
            rec = copy.copy(node)  # node stays as read: another index may share it
            finish_directory(rec, entries, digests)
            written[node.ref] = (self.meta.add(rec.encode()), rec.digest)
        new_root, digest = written[root.ref]
        return TreeStats(new_root, digest, files, len(order), nbytes)

    def _move_child(self, view: IndexView, ref: int, where: str) -> _Moved | Inode:
        """Move the non-directory at ref; a directory there is returned, to be walked."""
        child = self._dirs.get(ref)
        if child is None:
            leaf = self._move_plain_file(view.meta, ref, where)
            if leaf is not None:
                return leaf
            child = view.get(ref)
        return child if child.kind == F.DIR else self._write_leaf(child, where)

    def _move_plain_file(self, meta: MetaReader, ref: int, where: str) -> _Moved | None:
        """Move a regular file without xattrs (most records) as bytes: its extents
        rewritten, its digest recomputed, flags and reserved fields zeroed, as
        Inode.encode writes them.  None when ref is anything else, or a record with a fault
        decode_inode will name."""
        raw, start, end = meta.record_bytes(ref)
        plain = _plain_extents(raw, start, end)
        size = int.from_bytes(raw[start + 24:start + 32], "little")
        if plain is None or size > MAX_FILE_SIZE:
            return None
        extents, digested = [], []
        done = 0
        for foff, pack, poff, length, xxh in plain:
            if foff < done or length == 0 or foff + length > size:
                return None
            done = foff + length
            loc = self._chunk(pack, poff, length, xxh, ref, where)
            extents.append(F.EXTENT.pack(foff, loc.pack_id(), loc.offset, length, xxh))
            digested.append((foff, length, loc.sha))
        digest = plain_file_digest(record_attrs(raw[start:start + 48]), digested)
        record = b"".join((raw[start:start + 1], b"\0", raw[start + 2:start + 20], bytes(4),
                           raw[start + 24:start + 64], digest, bytes(32),
                           len(extents).to_bytes(4, "little"), *extents))
        return _Moved(self.meta.add(record), F.REG, size, digest)

    def _chunk(self, pack: int, poff: int, length: int, xxh: bytes, ref: int,
               where: str) -> ChunkLoc:
        loc = self.moved.get((pack, poff, length, xxh))
        if loc is None:  # used_chunks saw every extent: the record changed since
            raise CorruptImage(where, f"record {ref:#x} names a chunk the walk before did "
                                      "not see")
        return loc

    def _write_leaf(self, ino: Inode, where: str) -> _Moved:
        locs = [(foff, self._chunk(pack, poff, length, xxh, ino.ref, where))
                for foff, pack, poff, length, xxh in ino.extents]
        finish_leaf(ino, locs)
        return _Moved(self.meta.add(ino.encode()), ino.kind, ino.size, ino.digest)
