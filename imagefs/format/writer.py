"""Writing one transaction into an image: packs, metadata records, chunk table, commit.

`Transaction` is the only way state changes: it takes the writer lock, appends, and
publishes one commit (container.ImageFile.publish) or, on any error, cuts what it appended
and leaves the image as it was.  Capture, delete and export all go through it.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import Error, Interrupted

from . import layout as F
from .commit_record import Commit, IndexEntry
from .container import ImageFile, crash_point, now_iso
from .digest import node_digest
from .packs import ChunkLoc, ChunkTable, PackWriter, PrecompressedPack
from .records import Dirent, Inode, MetaWriter

MAX_TABLE_SEGMENTS = F.MAX_TABLE_SEGMENTS  # the name tests and older callers know


@dataclass(eq=False, slots=True)
class PendingInode:
    """An inode on its way into the image (capture, export, tests' crafted trees): its
    record `ino` to be completed and written, its children (directories) or the locations
    of its content's chunks (files).  `ref` is set once its record is written, or beforehand
    to reuse a record the image already holds."""

    ino: Inode
    children: list[tuple[bytes, PendingInode]] | None = None
    locs: list[tuple[int, ChunkLoc]] = field(default_factory=list)
    source: bytes | None = None
    sparse_hint: bool = False
    ref: int | None = None


@dataclass
class TreeStats:
    root: int
    digest: bytes
    files: int
    dirs: int
    bytes: int


def finish_directory(rec: Inode, entries: list[Dirent], child_digests: list[bytes]) -> None:
    """Complete a directory's record from its entries (name, kind, child ref; in name order)
    and its children's digests: entries, size, nlink and digest.  The one place a directory
    record is built, for a whole tree (write_tree) and for a session's commit."""
    rec.entries = entries
    rec.size = len(entries)
    rec.nlink = 2 + sum(1 for _n, kind, _r in entries if kind == F.DIR)
    rec.digest = node_digest(rec, (), child_digests)


def finish_leaf(rec: Inode, locs: list[tuple[int, ChunkLoc]]) -> None:
    """Complete a non-directory's record: a file's extents from the (file offset, ChunkLoc)
    of its chunks in offset order (none for other kinds), and the digest."""
    if rec.kind == F.REG:
        rec.extents = [(off, loc.pack_id(), loc.offset, loc.length, loc.xxh)
                       for off, loc in locs]
    rec.digest = node_digest(rec, [loc.sha for _o, loc in locs], ())


def write_tree(meta: MetaWriter, root: PendingInode) -> TreeStats:
    """Write every record under root, each inode once: first the non-directories, one
    directory's worth at a time, then all directories, children before parents.

    Directory records thus sit together, so listing a directory with its subdirectories'
    attributes (`ls -l /`, a mount's readdirplus) reads a few blocks, not one per child."""
    files = dirs = nbytes = 0
    # Pre-order list of directories (the root first); a directory is expanded once.
    order: list[PendingInode] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        for _name, child in node.children or []:
            if child.ino.kind != F.DIR:
                if child.ref is None:
                    nbytes += _write_leaf(meta, child)
            elif child.ref is None:
                stack.append(child)
    for node in reversed(order):  # every subdirectory comes after its parent in order
        if node.ref is not None:
            continue
        kids = node.children or []
        finish_directory(node.ino, [(name, child.ino.kind, child.ref or 0) for name, child in kids],
                         [child.ino.digest for _n, child in kids])
        dirs += 1
        files += sum(1 for _n, child in kids if child.ino.kind != F.DIR)
        node.ref = meta.add(node.ino.encode())
    assert root.ref is not None
    return TreeStats(root.ref, root.ino.digest, files, dirs, nbytes)


def _write_leaf(meta: MetaWriter, node: PendingInode) -> int:
    """Write a non-directory's record; returns its bytes if it is a regular file."""
    ino = node.ino
    finish_leaf(ino, node.locs)
    node.ref = meta.add(ino.encode())
    node.locs = []
    return ino.size if ino.kind == F.REG else 0


def history_entry(action: str, who: dict[str, Any] | None = None,
                  **details: Any) -> dict[str, Any]:
    """One line of an index's history.  `who` names the caller when the process is not
    (the daemon acting for a client: its uid and user, the method and its params)."""
    return {"when": now_iso(), "uid": os.getuid(), "user": _user(os.getuid()),
            "action": action, **details, **(who or {})}


@functools.lru_cache(maxsize=8)
def _user(uid: int) -> str:
    """This process's user name (looked up once per uid: an export of 50 000 indices
    writes 50 000 history entries)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


class Transaction:
    """Lock, read the current state, append, publish; or undo the appends on error."""

    def __init__(self, image: ImageFile, level: int = 3, wait: float | None = None,
                 on_wait: Callable[[], None] | None = None,
                 on_pack: Callable[[int, int], None] | None = None,
                 pack_threads: int | None = None,
                 offered: list[PrecompressedPack] | None = None) -> None:
        self.image = image
        self._offered = offered or []  # packs compressed ahead (PackWriter.offer)
        self._pack_threads = pack_threads  # None: a compressing thread per CPU
        self.level = level
        self._wait = wait
        self._on_wait = on_wait
        self._on_pack = on_pack
        self.commit: Commit
        self._table: ChunkTable | None = None
        self.packs: PackWriter | None = None
        self._stored = 0

    def __enter__(self) -> Transaction:
        try:
            self.image.lock(wait=0)
        except Error:
            if self._on_wait and self._wait != 0:  # no "waiting" note before a refusal
                self._on_wait()
            self.image.lock(wait=self._wait)
        self.commit = self.image.read_commit()
        self._start = self.commit.data_end
        self._published = False
        self.image.slot_written = False
        self.image.begin_append(self.commit)
        return self

    def pack_writer(self) -> PackWriter:
        """The writer for new chunks (deduplicated against everything the file holds)."""
        if self._table is None:
            self._table = ChunkTable.load(self.image, self.commit)
        if self.packs is None:
            self.packs = PackWriter(self.image, self._table, self.level,
                                    threads=self._pack_threads, on_written=self._on_pack)
            self.packs.offer(self._offered)
        return self.packs

    def finish_packs(self) -> None:
        """Write every pending pack: from here on every new chunk has its pack id."""
        if self.packs is not None:
            self.packs.finish()
            self._stored += self.packs.stored_bytes
            self.packs = None
        crash_point("after-packs")

    def copied_packs(self, stored_bytes: int) -> None:
        """Count pack frames appended as they were (pack_copy.PackCopier) in the commit's
        stored bytes, as the packs this transaction compresses are."""
        self._stored += stored_bytes

    def write_tree(self, root: PendingInode) -> TreeStats:
        """Finish the packs, then write root's records; returns what to put in the index."""
        with self.metadata() as meta:
            return write_tree(meta, root)

    @contextlib.contextmanager
    def metadata(self) -> Iterator[MetaWriter]:
        """A writer of records, once every pack is written (records name their packs'
        places); its last block is written when the block ends without error."""
        self.finish_packs()
        meta = MetaWriter(self.image, self.level)
        yield meta
        meta.flush()
        crash_point("after-metadata")

    def publish(self) -> Commit:
        commit = self.commit
        assert self.packs is None, "write_tree before publish"
        if self._table is not None and self._table.new:
            table = self._table
            if len(commit.tables) + 1 > F.MAX_TABLE_SEGMENTS:
                raw = table.encode_all()
                commit.tables = [[self.image.append_raw(F.KIND_TABLE, raw, 1), table.count]]
            else:
                raw = table.encode_new()
                off = self.image.append_raw(F.KIND_TABLE, raw, 1)
                commit.tables.append([off, len(table.new)])
            commit.chunks = table.count
            commit.unique_bytes = table.unique_bytes
            commit.stored_bytes += self._stored
        self.image.publish(commit)
        self._published = True
        return commit

    def __exit__(self, et: type | None, ev: BaseException | None, tb: object) -> None:
        if self.packs is not None and et is not None:
            self.packs.abort()
        if et is not None and not self._published and not self.image.slot_written:
            # Nothing was published: cut what this transaction appended.
            with contextlib.suppress(OSError):
                os.ftruncate(self.image.fd, self._start)
            if et is KeyboardInterrupt:
                raise Interrupted() from None


def add_index(commit: Commit, name: str, description: str, stats: TreeStats,
              history: dict[str, Any], created: str | None = None,
              old_history: list[dict[str, Any]] | None = None) -> int:
    when = now_iso()
    commit.indices.append(IndexEntry(
        name=name, description=description, created=created or when, modified=when,
        files=stats.files, dirs=stats.dirs, bytes=stats.bytes, root=stats.root,
        digest=stats.digest.hex(), history=[*(old_history or []), history],
    ))
    return len(commit.indices)
