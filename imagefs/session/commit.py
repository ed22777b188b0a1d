"""Committing a session: the records its changes need, and nothing else, in one Transaction.

Only dirty inodes are written: the changed ones and the directories above them (the session
tree keeps that invariant, changes.py).  Every other entry of a rewritten directory keeps
the ref it had, so unchanged subtrees are shared with the base by reference, and a file
whose bytes changed keeps the base's chunks outside its staged ranges: only the staged
bytes are cut into new chunks (deduplicated against everything the image holds).  The
cost is the changed data and the changed directories, plus loading the chunk table (to
deduplicate, and for the SHA-256s of kept chunks that the file's digest covers).

Publication is writer.Transaction's: a crash before the root slot is written leaves the
image as it was; after it, the new state.  Which one happened is known from the image
(the index's root), so staging is told afterwards and a crash between the two is resolved
when the session is loaded again (lifecycle.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyfastcdc.cy import FastCDC

from imagefs.errors import CorruptImage
from imagefs.format import layout as F
from imagefs.format.chunking import chunk_region
from imagefs.format.container import crash_point
from imagefs.format.packs import ChunkLoc, ChunkTable, PackWriter
from imagefs.format.records import Dirent, Inode, MetaWriter
from imagefs.format.writer import Transaction, finish_directory, finish_leaf
from imagefs.mount.tree import ROOT_INO

from .ranges import Ranges
from .staging import StagedInode
from .tree import SessionTree


@dataclass
class Written:
    """What a commit wrote: the new root, and the record of each inode it rewrote."""

    root: int
    digest: bytes
    refs: dict[int, int]
    records: int = 0
    new_bytes: int = 0
    stored_bytes: int = 0


class ChangeWriter:
    """Writes the dirty part of a SessionTree into an open Transaction."""

    def __init__(self, tree: SessionTree, tx: Transaction,
                 progress: Callable[[int], None] | None = None) -> None:
        self.tree = tree
        self.tx = tx
        self.progress = progress
        header = tx.image.header
        self.cdc = FastCDC(avg_size=header.chunk_avg, min_size=header.chunk_min,
                           max_size=header.chunk_max)
        self.chunk_min = header.chunk_min
        self._packs: PackWriter | None = None

    @property
    def packs(self) -> PackWriter:
        if self._packs is None:
            self._packs = self.tx.pack_writer()
        return self._packs

    @property
    def table(self) -> ChunkTable:
        return self.packs.table

    def write(self) -> Written:
        tree = self.tree
        root_node = tree.nodes.get(ROOT_INO)
        if root_node is None or not root_node.dirty:
            root = self._clean_ref(ROOT_INO)
            return Written(root, tree.view.get(root).digest, {})
        dirs, leaves = self._dirty_tree()
        # File contents first (packs), then the records, children before parents.
        locs = {node.ino: self._file_chunks(node) for node in leaves if node.kind == F.REG}
        new_bytes = self._packs.new_bytes if self._packs else 0
        self.tx.finish_packs()
        meta = MetaWriter(self.tx.image, self.tx.level)
        refs: dict[int, int] = {}
        digests: dict[int, bytes] = {}
        for node in leaves:
            rec = node.to_record(tree.xattrs(node.ino))
            finish_leaf(rec, locs.get(node.ino, []))
            refs[node.ino] = meta.add(rec.encode())
            digests[node.ino] = rec.digest
        for node in reversed(dirs):
            rec = self._directory_record(node, refs, digests)
            refs[node.ino] = meta.add(rec.encode())
            digests[node.ino] = rec.digest
        meta.flush()
        crash_point("after-metadata")
        return Written(refs[ROOT_INO], digests[ROOT_INO], refs, len(refs), new_bytes)

    # --- which inodes -----------------------------------------------------------------

    def _dirty_tree(self) -> tuple[list[StagedInode], list[StagedInode]]:
        """Dirty directories in pre-order (root first) and the dirty non-directories in
        them, each once."""
        tree = self.tree
        dirs: list[StagedInode] = []
        leaves: dict[int, StagedInode] = {}
        stack = [tree.nodes[ROOT_INO]]
        while stack:
            d = stack.pop()
            dirs.append(d)
            for _name, child in tree.listing(d.ino):
                node = tree.nodes.get(child)
                if node is None or not node.dirty:
                    continue
                if node.kind == F.DIR:
                    stack.append(node)
                else:
                    leaves[child] = node
        return dirs, list(leaves.values())

    def _clean_ref(self, ino: int) -> int:
        node = self.tree.nodes.get(ino)
        if node is not None and node.committed:
            return node.committed
        if node is not None and node.base is not None:
            return node.base
        return self.tree.base.ref_of(ino)

    # --- records ----------------------------------------------------------------------

    def _directory_record(self, node: StagedInode, refs: dict[int, int],
                          digests: dict[int, bytes]) -> Inode:
        """The record of a dirty directory: its children rewritten in this commit (refs,
        digests) are named by their new records, the others by the ones they had."""
        tree = self.tree
        entries: list[Dirent] = []
        child_digests = []
        for name, child in tree.listing(node.ino):
            if child in refs:
                ref, digest = refs[child], digests[child]
                kind = tree.attrs(child).kind
            else:
                ref = self._clean_ref(child)
                kind, digest = tree.view.kind_and_digest(ref)
            entries.append((name, kind, ref))
            child_digests.append(digest)
        rec = node.to_record(tree.xattrs(node.ino))
        finish_directory(rec, entries, child_digests)
        return rec

    def _file_chunks(self, node: StagedInode) -> list[tuple[int, ChunkLoc]]:
        """(file offset, ChunkLoc) of each extent of the file as it now reads: the base's
        chunks it still shows, and new chunks for every other data region."""
        tree = self.tree
        kept: list[tuple[int, ChunkLoc]] = []
        kept_ranges = Ranges()
        if node.base is not None:
            staged = node.staged or Ranges()
            base = tree.base.inode(node.ino)
            for foff, pack, poff, length, xxh in base.extents:
                end = foff + length
                if end > node.base_limit:
                    break
                if any(inside for _s, _e, inside in staged.pieces(foff, end)):
                    continue
                loc = self.table.at(pack, poff, xxh)
                if loc is None:
                    raise CorruptImage(tree.view.image.path,
                                       f"chunk {xxh.hex()} of a file is not in the table")
                kept.append((foff, loc))
                kept_ranges.add(foff, end)
        out = list(kept)

        def read(offset: int, n: int) -> bytes | memoryview:
            return tree.read(node.ino, offset, n)

        for start, end in tree.data_regions(node):
            for a, b in kept_ranges.gaps(start, end):
                out.extend(chunk_region(read, a, b, self.cdc, self.chunk_min,
                                        self.packs.add_chunk, self.progress))
        out.sort(key=lambda item: item[0])
        return out
