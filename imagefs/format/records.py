"""Metadata records: one inode each, packed into zstd metadata blocks and read lazily.

An index is a tree of records.  A directory record lists (name, kind, child ref); a child
ref is the address of the child's record (metadata block offset << 16 | record number), so
records are written children first and the root last.  Unchanged subtrees can later be
shared between indices by reference, and nothing needs to be read but the records on the
path asked for: `ls` of one directory reads its record and its children's.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass, field

from imagefs.errors import CorruptImage

from . import layout as F
from .container import ImageFile
from .lru import WeightedLRU

Extent = tuple[int, int, int, int, bytes]  # file offset, pack, offset in pack, length, xxh3
Dirent = tuple[bytes, int, int]  # name, kind, child ref


@dataclass(slots=True)
class Inode:
    kind: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    digest: bytes = bytes(32)
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    extents: list[Extent] = field(default_factory=list)
    target: bytes = b""
    entries: list[Dirent] = field(default_factory=list)
    ref: int = 0

    def encode(self) -> bytes:
        out = [F.INODE.pack(self.kind, 0, len(self.xattrs), self.mode, self.uid, self.gid,
                            self.nlink, 0, self.size, self.rdev, self.mtime_ns, self.atime_ns,
                            self.ctime_ns, self.digest, bytes(32))]
        for name, value in self.xattrs:
            out.append(F.XATTR_HEAD.pack(len(name), len(value)))
            out.append(name)
            out.append(value)
        if self.kind == F.REG:
            out.append(F.U32.pack(len(self.extents)))
            out.extend(F.EXTENT.pack(*e) for e in self.extents)
        elif self.kind == F.LNK:
            out.append(self.target)
        elif self.kind == F.DIR:
            out.append(F.U32.pack(len(self.entries)))
            for name, kind, ref in self.entries:
                out.append(F.DIRENT_HEAD.pack(ref, kind, len(name)))
                out.append(name)
        return b"".join(out)


def check_name(name: bytes) -> bool:
    """A name a directory may hold: what a filesystem would accept, and nothing that walks."""
    return 0 < len(name) <= 255 and name not in (b".", b"..") and b"/" not in name \
        and b"\0" not in name


XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
MAX_FILE_SIZE = (1 << 63) - 1  # off_t: no filesystem holds a larger file


def check_xattr_name(name: bytes) -> bool:
    """A name setxattr(2) could take: in one of Linux's namespaces, no NUL."""
    return b"\0" not in name and any(
        name.startswith(ns) and len(name) > len(ns) for ns in XATTR_NAMESPACES)


def check_rdev(rdev: int) -> bool:
    """A device number the kernel can hold (dev_t inside the kernel: 12-bit major,
    20-bit minor), so that mknod(2) takes it."""
    return 0 <= rdev < (1 << 64) and os.major(rdev) < (1 << 12) and os.minor(rdev) < (1 << 20)


def decode_inode(buf: bytes, where: str) -> Inode:
    """Parse one record, checking every length and count against the bytes there are."""
    n = len(buf)
    if n < F.INODE.size:
        raise CorruptImage(where, "record shorter than an inode")
    (kind, _flags, nx, mode, uid, gid, nlink, _r, size, rdev, mtime, atime, ctime, digest,
     _res) = F.INODE.unpack_from(buf)
    if kind not in F.KIND_NAMES:
        raise CorruptImage(where, f"unknown inode kind {kind}")
    if kind == F.REG and size > MAX_FILE_SIZE:
        raise CorruptImage(where, f"file size {size} is larger than any file can be")
    if kind in (F.CHR, F.BLK) and not check_rdev(rdev):
        raise CorruptImage(where, f"impossible device number {rdev:#x}")
    ino = Inode(kind, mode, uid, gid, nlink, size, rdev, mtime, atime, ctime, digest)
    pos = _decode_xattrs(buf, F.INODE.size, nx, ino, where) if nx else F.INODE.size
    if kind == F.REG:
        pos = _decode_extents(buf, pos, ino, where)
    elif kind == F.LNK:
        if size != n - pos or size == 0 or size > F.MAX_SYMLINK:
            raise CorruptImage(where, "symlink target length does not match the record")
        if b"\0" in buf[pos:]:
            raise CorruptImage(where, "symlink target holds a NUL byte")
        ino.target = buf[pos:]
        pos = n
    elif kind == F.DIR:
        pos = _decode_entries(buf, pos, ino, where)
    if pos != n:
        raise CorruptImage(where, "trailing bytes after the record")
    return ino


def _decode_xattrs(buf: bytes, pos: int, count: int, ino: Inode, where: str) -> int:
    n = len(buf)
    for _ in range(count):
        if pos + F.XATTR_HEAD.size > n:
            raise CorruptImage(where, "xattr count larger than the record")
        ln, lv = F.XATTR_HEAD.unpack_from(buf, pos)
        pos += F.XATTR_HEAD.size
        if lv > F.MAX_XATTR_VALUE or pos + ln + lv > n or ln == 0:
            raise CorruptImage(where, "xattr larger than the record")
        xname = buf[pos:pos + ln]
        if not check_xattr_name(xname):
            raise CorruptImage(where, f"bad xattr name {xname!r}")
        ino.xattrs.append((xname, buf[pos + ln:pos + ln + lv]))
        pos += ln + lv
    return pos


def _count(buf: bytes, pos: int, where: str, missing: str) -> tuple[int, int]:
    """The u32 count at pos, and the position after it; `missing` if the record ends."""
    if pos + 4 > len(buf):
        raise CorruptImage(where, missing)
    return F.U32.unpack_from(buf, pos)[0], pos + 4


def _decode_extents(buf: bytes, pos: int, ino: Inode, where: str) -> int:
    n = len(buf)
    count, pos = _count(buf, pos, where, "file record without extents")
    if count > (n - pos) // F.EXTENT.size:
        raise CorruptImage(where, f"extent count {count} larger than the record")
    end = 0
    for i in range(count):
        e = F.EXTENT.unpack_from(buf, pos + i * F.EXTENT.size)
        if e[0] < end or e[0] + e[3] > ino.size or e[3] == 0:
            raise CorruptImage(where, "extents overlap, are unsorted or pass the size")
        end = e[0] + e[3]
        ino.extents.append(e)
    return pos + count * F.EXTENT.size


def _decode_entries(buf: bytes, pos: int, ino: Inode, where: str) -> int:
    """Read the entries, then check them all at once (names, order, kinds: C-level scans of
    the whole list, a third of the per-entry checks' time: every directory a lookup or a
    commit reads is decoded here); any doubt goes to _entry_problem for the exact error."""
    n = len(buf)
    count, pos = _count(buf, pos, where, "directory record without entries")
    if count > (n - pos) // (F.DIRENT_HEAD.size + 1):
        raise CorruptImage(where, f"entry count {count} larger than the record")
    if count != ino.size:
        _entry_problem(buf, pos, count, where)
        raise CorruptImage(where, "directory size does not match its entry count")
    head, size = F.DIRENT_HEAD.unpack_from, F.DIRENT_HEAD.size
    entries = ino.entries
    start = pos
    for _ in range(count):
        if pos + size > n:
            _entry_problem(buf, start, count, where)
            raise CorruptImage(where, "directory entries run past the record")
        ref, ekind, ln = head(buf, pos)
        pos += size
        entries.append((buf[pos:pos + ln], ekind, ref))
        pos += ln
    names = [e[0] for e in entries]
    joined = b"".join(names)
    if (pos > n or b"/" in joined or b"\0" in joined
            or not all(names) or b"." in names or b".." in names
            or not {e[1] for e in entries} <= _KINDS
            or names != sorted(names) or len(set(names)) != count):
        del entries[:]
        _entry_problem(buf, start, count, where)
        raise CorruptImage(where, "bad directory entries")  # (found above, always)
    return pos


_KINDS = frozenset(F.KIND_NAMES)


def _entry_problem(buf: bytes, pos: int, count: int, where: str) -> None:
    """Raise the first problem of count entries at pos, checked one by one (the fast scan
    of _decode_entries found one); return if there is none."""
    n = len(buf)
    prev = b""
    for _ in range(count):
        if pos + F.DIRENT_HEAD.size > n:
            raise CorruptImage(where, "directory entries run past the record")
        _ref, ekind, ln = F.DIRENT_HEAD.unpack_from(buf, pos)
        pos += F.DIRENT_HEAD.size
        name = buf[pos:pos + ln]
        pos += ln
        if len(name) != ln or not check_name(name):
            raise CorruptImage(where, f"bad name in directory: {name!r}")
        if name <= prev:
            raise CorruptImage(where, f"directory entries unsorted or repeated: {name!r}")
        if ekind not in F.KIND_NAMES:
            raise CorruptImage(where, f"unknown entry kind {ekind}")
        prev = name


class MetaWriter:
    """Packs records into metadata blocks appended to the image; add() returns the ref."""

    def __init__(self, image: ImageFile, level: int) -> None:
        self.image = image
        self.level = level
        self._records: list[bytes] = []
        self._size = 0
        self._block_at: int | None = None

    def add(self, record: bytes) -> int:
        if self._records and (self._size + len(record) > F.META_TARGET
                              or len(self._records) >= F.MAX_RECORDS_PER_META):
            self.flush()
        if len(record) > F.MAX_RAW[F.KIND_META] - 16:
            raise CorruptImage(self.image.path, "a directory or file record is too large")
        if self._block_at is None:
            self._block_at = self.image.append_pos
        self._records.append(record)
        self._size += len(record)
        return (self._block_at << 16) | (len(self._records) - 1)

    def flush(self) -> None:
        if not self._records:
            return
        count = len(self._records)
        offsets = [0] * (count + 1)
        base = 4 + 4 * (count + 1)
        pos = base
        for i, r in enumerate(self._records):
            offsets[i] = pos
            pos += len(r)
        offsets[count] = pos
        raw = F.U32.pack(count) + b"".join(F.U32.pack(o) for o in offsets) + b"".join(
            self._records)
        at = self.image.append_raw(F.KIND_META, raw, self.level)
        assert at == self._block_at
        self._records = []
        self._size = 0
        self._block_at = None


_DIGEST_AT = F.INODE.size - 64  # the digest field: the last 64 bytes of the head are
# the digest and a reserved 32 (layout.INODE)


class MetaReader:
    """Reads records by ref through a bounded cache of decompressed metadata blocks."""

    def __init__(self, image: ImageFile, cache_bytes: int = 64 << 20) -> None:
        self.image = image
        self._blocks: WeightedLRU[int, tuple[bytes, list[int]]] = WeightedLRU(
            cache_bytes, lambda block: len(block[0]))
        self.decoded = 0  # blocks read and decompressed (tests count them)
        self._lock = threading.Lock()

    def block(self, offset: int) -> tuple[bytes, list[int]]:
        hit = self._blocks.get(offset)
        if hit is not None:
            return hit
        raw = self.image.read_frame(offset, F.KIND_META)
        where = f"{self.image.path}: metadata block at offset {offset}"
        if len(raw) < 8:
            raise CorruptImage(where, "too short")
        (count,) = F.U32.unpack_from(raw)
        table_end = 4 + 4 * (count + 1)
        if count == 0 or count > F.MAX_RECORDS_PER_META or table_end > len(raw):
            raise CorruptImage(where, f"record count {count} larger than the block")
        offsets = list(struct.unpack_from(f"<{count + 1}I", raw, 4))  # one call: a block
        # holds up to thousands of records, and a commit reads many blocks
        if offsets[0] != table_end or offsets[-1] != len(raw) or offsets != sorted(offsets):
            raise CorruptImage(where, "record offsets out of order or past the block")
        entry = (raw, offsets)
        with self._lock:
            self.decoded += 1
        self._blocks.put(offset, entry)
        return entry

    def get(self, ref: int) -> Inode:
        raw, start, end = self.record_bytes(ref)
        ino = decode_inode(raw[start:end], f"{self.image.path}: record {ref:#x}")
        ino.ref = ref
        return ino

    def kind_and_digest(self, ref: int) -> tuple[int, bytes]:
        """The kind and digest of a record, read from its fixed head without decoding the
        rest: a commit names every unchanged entry of a rewritten directory by these."""
        raw, start, end = self.record_bytes(ref)
        if end - start < F.INODE.size:
            raise CorruptImage(f"{self.image.path}: record {ref:#x}",
                               "record shorter than an inode")
        kind = raw[start]
        if kind not in F.KIND_NAMES:
            raise CorruptImage(f"{self.image.path}: record {ref:#x}",
                               f"unknown inode kind {kind}")
        at = start + _DIGEST_AT
        return kind, raw[at:at + 32]

    def record_bytes(self, ref: int) -> tuple[bytes, int, int]:
        """The decompressed block holding record ref, and where the record lies in it."""
        offset, number = ref >> 16, ref & 0xFFFF
        raw, offsets = self.block(offset)
        if number + 1 >= len(offsets):
            raise CorruptImage(f"{self.image.path}: metadata block at offset {offset}",
                               f"no record {number}")
        return raw, offsets[number], offsets[number + 1]
