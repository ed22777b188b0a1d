"""Cryptographic digests of nodes and indices (Merkle style, SHA-256).

A node's digest covers its kind, mode, owner, link count, size, device number, mtime
(ns), xattrs, and: for a file, each data extent's offset, length and content SHA-256; for
a symlink, its target; for a directory, each entry's name and child digest.  It leaves out
atime and ctime (not restorable) and where chunks are stored, so an exported or
re-captured copy of the same tree has the same digest.  The index digest is the root's.

Two indices with equal digests hold the same tree; a subtree whose digest is unchanged
need not be compared (diff) or re-hashed (commit).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from . import layout as F
from .records import Inode

_ATTRS = struct.Struct("<BIIIIQQq")
_EXT = struct.Struct("<QI")


def node_digest(ino: Inode, chunk_shas: Sequence[bytes], child_digests: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(b"imagefs-node-1")
    h.update(_ATTRS.pack(ino.kind, ino.mode, ino.uid, ino.gid, ino.nlink, ino.size, ino.rdev,
                         ino.mtime_ns))
    h.update(len(ino.xattrs).to_bytes(4, "little"))
    for name, value in sorted(ino.xattrs):
        h.update(len(name).to_bytes(4, "little") + name)
        h.update(len(value).to_bytes(4, "little") + value)
    if ino.kind == F.REG:
        _add_extents(h, ((ext[0], ext[3], sha)
                         for ext, sha in zip(ino.extents, chunk_shas, strict=True)))
    elif ino.kind == F.LNK:
        h.update(ino.target)
    elif ino.kind == F.DIR:
        for (name, _k, _r), d in zip(ino.entries, child_digests, strict=True):
            h.update(len(name).to_bytes(4, "little") + name + d)
    return h.digest()


def record_attrs(record: bytes | memoryview) -> bytes:
    """A record's digested attributes (kind, mode, uid, gid, nlink, size, rdev, mtime) as
    node_digest packs them, sliced from the record's fixed part (layout.INODE), whose
    fields have the same widths and byte order."""
    return bytes(record[0:1]) + bytes(record[4:20]) + bytes(record[24:48])


def plain_file_digest(attrs: bytes, extents: Iterable[tuple[int, int, bytes]]) -> bytes:
    """node_digest of a regular file without xattrs, from its record_attrs and (file
    offset, length, chunk SHA-256) per extent: what moving a file's record recomputes
    without decoding it (format.relocate)."""
    h = hashlib.sha256(b"imagefs-node-1")
    h.update(attrs)
    h.update(bytes(4))  # no xattrs
    _add_extents(h, extents)
    return h.digest()


def _add_extents(h: Any, extents: Iterable[tuple[int, int, bytes]]) -> None:
    """A file's part of its digest: (file offset, length, chunk SHA-256) per extent."""
    for offset, length, sha in extents:
        h.update(_EXT.pack(offset, length) + sha)
