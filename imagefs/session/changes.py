"""Bookkeeping of a change, shared by every kind of change (namespace.py, attributes.py,
content.py): copy an inode's attributes into staging at its first change, and mark it and
every directory above it dirty, so that commit rewrites exactly those records.

The parent of an inode is the directory the kernel reached it through (reading.py counts
lookups exactly and drops them at forget); an inode with several names has its parents
found by one walk of the tree.
"""

from __future__ import annotations

import errno
import time

from imagefs.format import layout as F
from imagefs.mount.tree import ROOT_INO, Refusal

from .reading import TreeReading
from .staging import StagedInode


class TreeChanges(TreeReading):
    """Copy-on-first-change, dirty marking up to the root, directory entries and counts."""

    def _own(self, ino: int) -> StagedInode:
        """The StagedInode of ino, copying the base's attributes (only) on first change."""
        node = self.nodes.get(ino)
        if node is not None:
            return node
        node = StagedInode.from_record(ino, self._record(ino), self.parents.get(ino, 0))
        self.nodes[ino] = node
        return node

    def _changed(self, node: StagedInode) -> None:
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

    def _parents_of(self, node: StagedInode) -> list[int]:
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

    def _dir_for_change(self, ino: int) -> StagedInode:
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

    def _set_entry(self, d: StagedInode, name: bytes, child: int | None) -> None:
        assert d.entries is not None
        if child is None:
            del d.entries[name]
        else:
            d.entries[name] = child
        self.st.entry_set(d.ino, name, child)
        now = time.time_ns()
        d.mtime_ns = d.ctime_ns = now
        self._changed(d)

    def _count_size(self, node: StagedInode, old_size: int) -> None:
        if node.kind == F.REG and node.nlink > 0 and node.size != old_size:
            self.counts.bytes += node.size - old_size
            self.st.meta_set("counts", vars(self.counts))

    def _count(self, files: int = 0, dirs: int = 0, nbytes: int = 0) -> None:
        self.counts.files += files
        self.counts.dirs += dirs
        self.counts.bytes += nbytes
        self.st.meta_set("counts", vars(self.counts))
