"""Chunk storage: packs of content-defined chunks, one zstd frame per pack.

This is the one interface between content and where it lives.  Metadata only ever holds a
chunk's address (pack id, offset in the pack, length, xxh3-128); `PackReader.read_chunk`
and `PackWriter.add_chunk` are all the rest of imagefs uses.  In the local backend a pack
id is the pack frame's file offset; an object-store backend maps pack ids to object keys
behind the same two classes.

Identity: a chunk is looked up by its xxh3-128 (fast) and confirmed by its SHA-256 before
it is shared, so a crafted xxh3 collision is stored as a chunk of its own, never as the
chunk it collides with.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn

import xxhash

from imagefs.errors import ChecksumMismatch, CorruptImage

from . import layout as F
from .commit_record import Commit
from .container import ImageFile, compressor
from .lru import WeightedLRU

if TYPE_CHECKING:
    from .decoded import DecodedPacks

# A decompressed pack: its bytes, or a kept one mapped (decoded.py); sliced, it is bytes.
Unpacked = bytes | mmap.mmap


def fast_hash(data: bytes | memoryview) -> bytes:
    """xxh3-128 of a chunk: the dedup key and the checksum checked on every read."""
    if _WEAK_FAST_HASH:
        return bytes(16)  # test-only: every chunk "collides" (IMAGEFS_TEST_WEAK_FASTHASH)
    return xxhash.xxh3_128_digest(data)


_WEAK_FAST_HASH = os.environ.get("IMAGEFS_TEST_WEAK_FASTHASH") == "1"


class ChunkLoc:
    """Where a chunk is (or will be, once its pack is written) and what it is."""

    __slots__ = ("pack", "offset", "length", "xxh", "sha")

    def __init__(self, pack: _PendingPack | int, offset: int, length: int, xxh: bytes,
                 sha: bytes) -> None:
        self.pack = pack
        self.offset = offset
        self.length = length
        self.xxh = xxh
        self.sha = sha

    def pack_id(self) -> int:
        p = self.pack
        if isinstance(p, _PendingPack):
            assert p.offset is not None, "pack not written yet"
            return p.offset
        return p


class _PendingPack:
    __slots__ = ("offset",)

    def __init__(self) -> None:
        self.offset: int | None = None


XXH_SIZE = 16  # bytes of an xxh3-128: the first field of a chunk table entry


class ChunkTable:
    """Every chunk the file stores: xxh3-128 → candidates; loaded by writers only.

    Loading keeps each segment's raw entries and indexes nothing: a commit that adds a few
    chunks (a session's one changed file) asks a few questions, each answered by a search of
    the raw bytes (`bytes.find`, C speed).  After INDEX_AFTER questions the entries are
    indexed once, so a capture's millions of questions cost a dict lookup each: by where
    each entry lies (its xxh3-128 sliced from the raw bytes; an entry is unpacked when
    asked for), ~1 ms for 10 000 entries where an object per entry took 7-10 ms of a
    servicing transaction's commit.  Entries are made objects only to list them all
    (all()), or when two entries share an xxh3-128."""

    # questions answered by searching the raw entries before indexing them: a search of
    # 10 000 entries costs ~0.1-0.2 ms, indexing them by place ~1.5 ms
    INDEX_AFTER = 16

    def __init__(self) -> None:
        self.by_xxh: dict[bytes, ChunkLoc | list[ChunkLoc]] = {}
        self.new: list[ChunkLoc] = []
        self.count = 0
        self.unique_bytes = 0
        self._raw: list[bytes] = []  # loaded segments not indexed yet
        self._searches = 0
        # indexed segments, and where in them each xxh3-128 is: segment number << 32 |
        # entry number (only while no two of their entries share an xxh3-128)
        self._segments: list[bytes] = []
        self._where: dict[bytes, int] = {}

    @classmethod
    def load(cls, image: ImageFile, commit: Commit) -> ChunkTable:
        table = cls()
        for offset, count in commit.tables:
            raw = image.read_frame(offset, F.KIND_TABLE)
            if len(raw) != count * F.CHUNK_ENTRY.size:
                raise CorruptImage(image.path, f"chunk table at offset {offset} holds "
                                               f"{len(raw)} bytes for {count} chunks")
            table._raw.append(raw)
            table.count += count
            table.unique_bytes += _lengths(raw)
        return table

    def _index(self) -> None:
        """Index the raw segments' entries (once) by where they lie."""
        if not self._raw:
            return
        raw, self._raw = self._raw, []
        size, base = F.CHUNK_ENTRY.size, len(self._segments)
        where: dict[bytes, int] = {}
        entries = 0
        for number, segment in enumerate(raw, base):
            keys = [segment[at:at + XXH_SIZE] for at in range(0, len(segment), size)]
            where.update(zip(keys, range(number << 32, (number << 32) + len(keys)), strict=True))
            entries += len(keys)
        self._segments += raw
        if len(where) != entries or where.keys() & self._where.keys():
            self._objects()  # an xxh3-128 twice: index objects, which list them all
        else:
            self._where.update(where)

    def _objects(self) -> None:
        """Put every indexed entry in by_xxh, as objects, before those added since."""
        segments, self._segments, self._where = self._segments, [], {}
        if not segments:
            return
        self.by_xxh = {}
        for segment in segments:
            for xxh, sha, pack, off, length in F.CHUNK_ENTRY.iter_unpack(segment):
                self._put(ChunkLoc(pack, off, length, xxh, sha))
        for loc in self.new:
            self._put(loc)

    def _put(self, loc: ChunkLoc) -> None:
        have = self.by_xxh.get(loc.xxh)
        if have is None:
            self.by_xxh[loc.xxh] = loc
        elif isinstance(have, list):
            have.append(loc)
        else:
            self.by_xxh[loc.xxh] = [have, loc]

    def _candidates(self, xxh: bytes) -> list[ChunkLoc]:
        """Every entry whose xxh3-128 is xxh: from the index, and from the raw segments
        while they are not indexed."""
        if self._raw:
            self._searches += 1
            if self._searches > self.INDEX_AFTER:
                self._index()
        found = []
        size = F.CHUNK_ENTRY.size
        at = self._where.get(xxh)
        if at is not None:
            _x, sha, pack, off, length = F.CHUNK_ENTRY.unpack_from(
                self._segments[at >> 32], (at & 0xFFFFFFFF) * size)
            found.append(ChunkLoc(pack, off, length, xxh, sha))
        have = self.by_xxh.get(xxh)
        if have is not None:
            found += have if isinstance(have, list) else [have]
        for segment in self._raw:
            at = segment.find(xxh)
            while at >= 0:
                if at % size == 0:  # an entry's start, not bytes inside another field
                    _x, sha, pack, off, length = F.CHUNK_ENTRY.unpack_from(segment, at)
                    found.append(ChunkLoc(pack, off, length, xxh, sha))
                at = segment.find(xxh, at + 1)
        return found

    def find(self, xxh: bytes, sha: bytes) -> ChunkLoc | None:
        for loc in self._candidates(xxh):
            if loc.sha == sha:
                return loc
        return None

    def at(self, pack: int, offset: int, xxh: bytes) -> ChunkLoc | None:
        """The stored chunk at a location (an extent's), found through its xxh3."""
        for loc in self._candidates(xxh):
            if loc.offset == offset and loc.pack == pack:
                return loc
        return None

    def add(self, loc: ChunkLoc) -> None:
        self._put(loc)
        self.new.append(loc)
        self.count += 1
        self.unique_bytes += loc.length

    def all(self) -> list[ChunkLoc]:
        self._index()
        self._objects()
        out: list[ChunkLoc] = []
        for v in self.by_xxh.values():
            out.extend(v if isinstance(v, list) else (v,))
        return out

    def encode_new(self) -> bytes:
        return b"".join(F.CHUNK_ENTRY.pack(c.xxh, c.sha, c.pack_id(), c.offset, c.length)
                        for c in self.new)

    def encode_all(self) -> bytes:
        return b"".join(F.CHUNK_ENTRY.pack(c.xxh, c.sha, c.pack_id(), c.offset, c.length)
                        for c in self.all())


def _lengths(raw: bytes) -> int:
    """The sum of the entries' lengths (each entry's last little-endian u32), without an
    object per entry."""
    if sys.byteorder != "little":
        return sum(e[4] for e in F.CHUNK_ENTRY.iter_unpack(raw))
    words = F.CHUNK_ENTRY.size // 4
    return sum(memoryview(raw).cast("I")[words - 1::words])


class PrecompressedPack:
    """A pack compressed before the commit that may store it (see ahead.py): its raw bytes,
    its zstd payload, and the (offset, length, xxh3-128, SHA-256) of each chunk in it."""

    __slots__ = ("raw", "payload", "chunks")

    def __init__(self, raw: bytes, payload: bytes,
                 chunks: list[tuple[int, int, bytes, bytes]]) -> None:
        self.raw = raw
        self.payload = payload
        self.chunks = chunks


class _Offer:
    """A PrecompressedPack in one PackWriter: where it will be, which chunks were stored."""

    __slots__ = ("source", "pack", "stored")

    def __init__(self, source: PrecompressedPack) -> None:
        self.source = source
        self.pack = _PendingPack()
        self.stored: list[ChunkLoc] = []


class PackWriter:
    """Packs new chunks into ~1 MiB packs, compresses them on worker threads (zstd releases
    the GIL) and appends them to the image in order."""

    MAX_PENDING = 6

    def __init__(self, image: ImageFile, table: ChunkTable, level: int,
                 threads: int | None = None,
                 on_written: Callable[[int, int], None] | None = None) -> None:
        self.image = image
        self.table = table
        self.level = level
        self.target = image.header.pack_target
        self._buf = bytearray()
        self._pack = _PendingPack()
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 2)
        # packs sealed but not yet written: each holds its raw bytes and a compressor
        # context (~11 MB at level 9) busy, so fewer threads keep fewer waiting
        self.max_pending = self.MAX_PENDING if threads is None else 2 * threads
        self._pending: list[tuple[_PendingPack, int, Future[bytes]]] = []
        self.stored_bytes = 0
        self.new_bytes = 0
        self._on_written = on_written
        self._offers: list[_Offer] = []
        self._offered: dict[bytes, tuple[_Offer, int, int]] = {}  # xxh + sha -> where

    def offer(self, packs: list[PrecompressedPack]) -> None:
        """Chunks this writer may be asked to store, compressed already.  A pack whose every
        chunk is stored is written as it is (no compression at the commit); the chunks
        stored from any other pack are compressed again with the rest, so an offer never
        adds a byte the commit did not store."""
        for source in packs:
            offer = _Offer(source)
            self._offers.append(offer)
            for off, length, xxh, sha in source.chunks:
                self._offered.setdefault(xxh + sha, (offer, off, length))

    def add_chunk(self, data: bytes | memoryview, xxh: bytes | None = None,
                  sha: bytes | None = None) -> ChunkLoc:
        """The location of this content, stored once: an existing chunk or a new one."""
        xxh = xxh or fast_hash(data)
        sha = sha or hashlib.sha256(data).digest()
        loc = self.table.find(xxh, sha)
        if loc is not None:
            return loc
        offered = self._offered.pop(xxh + sha, None) if self._offered else None
        if offered is not None and offered[2] == len(data):
            offer, off, _length = offered
            loc = ChunkLoc(offer.pack, off, len(data), xxh, sha)
            offer.stored.append(loc)
        else:
            loc = ChunkLoc(self._pack, len(self._buf), len(data), xxh, sha)
            self._buf += data
        self.table.add(loc)
        self.new_bytes += len(data)
        if len(self._buf) >= self.target:
            self._seal()
        return loc

    def _place_offers(self) -> None:
        """Write each offered pack stored whole; move the chunks stored from the others
        into this writer's own packs."""
        offers, self._offers, self._offered = self._offers, [], {}
        for offer in offers:
            if not offer.stored:
                continue
            source = offer.source
            if len(offer.stored) == len(source.chunks):
                offer.pack.offset = self.image.append_frame(
                    F.KIND_PACK, source.payload, len(source.raw), F.CODEC_ZSTD)
                self.stored_bytes += F.FRAME_HEADER + len(source.payload)
                if self._on_written:
                    self._on_written(len(source.raw), len(source.payload))
                continue
            for loc in offer.stored:
                loc.pack, start = self._pack, loc.offset
                loc.offset = len(self._buf)
                self._buf += source.raw[start:start + loc.length]
                if len(self._buf) >= self.target:
                    self._seal()

    def _seal(self) -> None:
        if not self._buf:
            return
        raw = bytes(self._buf)
        fut = self._pool.submit(_compress, raw, self.level)
        self._pending.append((self._pack, len(raw), fut))
        self._buf = bytearray()
        self._pack = _PendingPack()
        while len(self._pending) > self.max_pending:
            self._write_oldest()

    def _write_oldest(self) -> None:
        pack, raw_len, fut = self._pending.pop(0)
        payload = fut.result()
        pack.offset = self.image.append_frame(F.KIND_PACK, payload, raw_len, F.CODEC_ZSTD)
        self.stored_bytes += F.FRAME_HEADER + len(payload)
        if self._on_written:
            self._on_written(raw_len, len(payload))

    def finish(self) -> None:
        """Write every pending pack; after this every ChunkLoc has its pack id."""
        self._place_offers()
        self._seal()
        while self._pending:
            self._write_oldest()
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _compress(raw: bytes, level: int) -> bytes:
    return compressor(level).compress(raw)


class PackReader:
    """Chunks by address, through a byte-bounded LRU of decompressed packs.

    Each pack is decompressed once at a time (single-flight): concurrent readers of the same
    pack wait for the first one's result instead of decompressing it again.  A chunk's xxh3
    is checked the first time it is read from a cached pack, not on every read of it."""

    def __init__(self, image: ImageFile, cache_bytes: int = 256 << 20,
                 decoded: DecodedPacks | None = None) -> None:
        self.image = image
        # where decompressed packs are kept for other processes (decoded.py), or None
        self.decoded = decoded
        # at least two of the file's largest packs, so that reading on across a pack's end
        # never decompresses one twice (8 MiB packs of the compact profile, a small cache)
        largest = image.header.pack_target + image.header.chunk_max
        self._cache: WeightedLRU[int, Unpacked] = WeightedLRU(
            max(cache_bytes, 2 * largest), len)
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        # pack -> the (offset, length, xxh3) of each chunk checked in it: a verdict holds
        # for exactly the range and hash it was reached with, never for another extent
        # that shares the offset (a crafted one could otherwise skip its check).
        self._verified: dict[int, set[tuple[int, int, bytes]]] = {}
        self.decompressions = 0
        # pack -> (place, name) of the kept pack it was mapped from (decoded.py): one
        # whose chunk fails its check is dropped there and decompressed again
        self._kept: dict[int, tuple[str | None, str | None]] = {}
        self._file: os.stat_result | None = None  # the image file's, for places
        # called with each pack's offset once it is in the cache, in the thread that
        # decompressed it, outside the lock (a mount's page filler: prefill.py)
        self.on_cached: Callable[[int], None] | None = None

    def is_cached(self, pack: int) -> bool:
        """Whether pack is decompressed in the cache now (its LRU place unchanged)."""
        return pack in self._cache

    def pack(self, pack: int) -> Unpacked:
        while True:
            with self._lock:
                raw = self._cache.get(pack)
                if raw is not None:
                    return raw
                ev = self._inflight.get(pack)
                if ev is None:
                    ev = self._inflight[pack] = threading.Event()
                    break
            ev.wait()
        try:
            raw = self._decompressed(pack)
            with self._lock:
                for gone in self._cache.put(pack, raw):
                    self._verified.pop(gone, None)
            if self.on_cached is not None:
                self.on_cached(pack)
            return raw
        finally:
            with self._lock:
                del self._inflight[pack]
            ev.set()

    def _decompressed(self, pack: int) -> Unpacked:
        """The pack's bytes: mapped from the kept packs when they hold it (found by its
        place in this file, else by its stored bytes), else decompressed (and kept)."""
        if self.decoded is None:
            self.decompressions += 1
            return self.image.read_frame(pack, F.KIND_PACK)
        place = None
        if self.image.fd >= 0:
            info = self.image.frame_info(pack, F.KIND_PACK)
            if info.codec == F.CODEC_STORED:  # nothing to decompress, nothing kept
                return self.image.read_stored(pack, F.KIND_PACK)[1]
            if self._file is None:
                self._file = os.fstat(self.image.fd)
            place = self.decoded.place(self._file, pack, info.check, info.stored, info.raw)
            mapped = self.decoded.load_at(place, info.raw)
            if mapped is not None:
                self._kept[pack] = (place, None)
                return mapped
        info, stored = self.image.read_stored(pack, F.KIND_PACK)
        if info.codec == F.CODEC_STORED:
            return stored
        name = self.decoded.name(stored)
        raw: Unpacked | None = self.decoded.load(name, info.raw)
        if raw is not None:
            self._kept[pack] = (place, name)
        else:
            self.decompressions += 1
            raw = self.image.decode_checked(info, stored)
            self.decoded.keep(name, raw)
        if place is not None:
            self.decoded.remember(place, name)
        return raw

    def _unkeep(self, pack: int) -> bool:
        """Drop a pack mapped from the kept packs (one of its chunks failed its check)
        here and there; whether it was one."""
        with self._lock:
            kept = self._kept.pop(pack, None)
            if kept is None:
                return False
            self._cache.pop(pack)
            self._verified.pop(pack, None)
        if self.decoded is not None:
            self.decoded.forget(*kept)
        return True

    def read_chunk(self, pack: int, offset: int, length: int, xxh: bytes) -> bytes:
        return self.checked(pack, offset, length, xxh)[offset:offset + length]

    def checked(self, pack: int, offset: int, length: int, xxh: bytes) -> Unpacked:
        """The decompressed pack holding a chunk, that chunk's xxh3 checked: callers slice
        it (or view it, without a copy).  A kept pack whose chunk fails is read again from
        the image, once."""
        raw = self.pack(pack)
        key = (offset, length, xxh)
        done = self._verified.get(pack)
        if done is None or key not in done:
            if not self._holds(raw, offset, length, xxh):
                if not self._unkeep(pack):
                    self._fail(pack, offset, length, len(raw))
                raw = self.pack(pack)
                if not self._holds(raw, offset, length, xxh):
                    self._fail(pack, offset, length, len(raw))
            with self._lock:
                if pack in self._cache:
                    self._verified.setdefault(pack, set()).add(key)
        return raw

    @staticmethod
    def _holds(raw: Unpacked, offset: int, length: int, xxh: bytes) -> bool:
        return offset + length <= len(raw) and \
            fast_hash(memoryview(raw)[offset:offset + length]) == xxh

    def _fail(self, pack: int, offset: int, length: int, size: int) -> NoReturn:
        if offset + length > size:
            raise CorruptImage(self.image.path, f"chunk at {offset}+{length} lies past the "
                                                f"end of pack {pack}")
        raise ChecksumMismatch(self.image.path, f"chunk at {offset} of pack {pack}")
