"""The image file as a container: header, two root slots, append-only frames, commits.

How a new state is published, and why a crash at any moment is safe
---------------------------------------------------------------------
An image file is a 4096-byte header followed by frames (packs of chunks, metadata blocks,
chunk-table segments, commit records), each with its own checksums.  Nothing before the
committed end of the file is ever rewritten.  A writer:

1. takes an exclusive ``flock`` on the file (one writer at a time; readers take no lock);
2. reads the current commit and truncates anything after its end (the leftovers of a
   writer that died before publishing: no commit refers to them);
3. appends its new frames: packs, metadata, a chunk-table segment, and last a commit frame
   that lists every index, every chunk-table segment and the new committed end;
4. ``fsync``s the file, so that everything the new commit refers to is durable;
5. writes one 64-byte root slot (the older of the two, A or B) with generation + 1, the
   commit frame's offset, length and xxh3-128, and the slot's own checksum;
6. ``fsync``s again.

Step 5 is the single small write that publishes.  Until it is durable, readers and a
restarted writer find the old slot (higher generation among the *valid* slots) and so the
old state; once it is, they find the new one.  A slot torn by power loss fails its checksum
and is ignored, leaving the previous generation in the other slot.  Readers of an old state
are never disturbed: the frames they use are below the old committed end, which is never
rewritten; step 2 only cuts bytes no published state refers to.

Space of deleted indices is not reclaimed in place (as with WIM files); ``imagefs export``
writes a compacted copy holding only what the chosen indices reference.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import os
import signal
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

import xxhash
import zstandard

from imagefs.errors import (
    Busy,
    ChecksumMismatch,
    CorruptImage,
    ImageReplaced,
    NoSuchImage,
    NotAnImage,
    SystemFailure,
    UnsupportedVersion,
)

from . import layout as F
from .commit_record import Commit
from .files import flock_within, fsync_dir, open_regular, pwrite_all


def crash_point(name: str) -> None:
    """Test-only hook: die by SIGKILL at a named point when IMAGEFS_TEST_CRASH_AT names it."""
    if os.environ.get("IMAGEFS_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Header:
    version: int
    uuid: bytes
    chunk_min: int
    chunk_avg: int
    chunk_max: int
    pack_target: int

    def encode(self) -> bytes:
        head = F.HEADER.pack(F.MAGIC, self.version, F.HEADER_SIZE, self.uuid, self.chunk_min,
                             self.chunk_avg, self.chunk_max, self.pack_target)
        return head + F.HEADER_CHECK.pack(xxhash.xxh3_64_intdigest(head))


@dataclass
class FrameInfo:
    offset: int
    kind: bytes
    codec: int
    stored: int
    raw: int
    check: int

    @property
    def end(self) -> int:
        return self.offset + F.FRAME_HEADER + self.stored


class ImageFile:
    """An open image file: bounded, checked reads of frames; appends and publication."""

    def __init__(self, path: str, fd: int, header: Header, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.writable = writable
        self._append_pos: int | None = None
        self.slot_written = False  # set the moment a publication's slot write returned
        self._local = threading.local()  # a ZstdDecompressor is not thread-safe
        self.unnamed = False  # an O_TMPFILE file that path will name once it is whole

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, writable: bool = False) -> Self:
        fd = open_regular(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            header = cls.parse_header(path, fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, writable)

    @staticmethod
    def parse_header(path: str, fd: int) -> Header:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAnImage(path, "not a regular file")
        raw = os.pread(fd, F.HEADER_SIZE, 0)
        if len(raw) < F.HEADER_USED:
            raise NotAnImage(path, f"only {len(raw)} bytes long" if raw else "empty file")
        magic, version, hsize, fuuid, cmin, cavg, cmax, ptarget = F.HEADER.unpack_from(raw)
        if magic != F.MAGIC:
            raise NotAnImage(path, "wrong magic bytes")
        # The checksum first: a damaged version field is damage, not a newer format.
        (check,) = F.HEADER_CHECK.unpack_from(raw, F.HEADER.size)
        if check != xxhash.xxh3_64_intdigest(raw[: F.HEADER.size]):
            raise ChecksumMismatch(path, "the file header")
        if version > F.FORMAT_VERSION:
            raise UnsupportedVersion(path, version, F.FORMAT_VERSION)
        if version < 1 or hsize != F.HEADER_SIZE:
            raise CorruptImage(path, f"header claims version {version}, size {hsize}")
        if len(raw) < F.HEADER_SIZE:
            raise CorruptImage(path, f"truncated header ({len(raw)} of {F.HEADER_SIZE} bytes)")
        if not (1024 <= cmin <= cavg <= cmax <= F.MAX_RAW[F.KIND_PACK]
                and cmax <= ptarget <= F.MAX_RAW[F.KIND_PACK] // 2):
            raise CorruptImage(path, "header has impossible chunking parameters")
        return Header(version, fuuid, cmin, cavg, cmax, ptarget)

    @classmethod
    def create(cls, path: str, pack_target: int = F.PACK_TARGET) -> None:
        """Create an empty image (no indices) at path, atomically; FileExistsError if taken.

        The header is written to a temporary file that is then hard-linked into place, so a
        crash leaves either no file or a complete empty one, and two creators cannot both
        win."""
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            raise NoSuchImage(f"{path} (its directory does not exist)") from None
        except OSError as e:
            raise SystemFailure(path, e.strerror) from None
        try:
            os.write(fd, cls.new_header(pack_target))
            os.fsync(fd)
            os.close(fd)
            os.link(tmp, path)
            fsync_dir(directory)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @staticmethod
    def new_header(pack_target: int = F.PACK_TARGET) -> bytes:
        """The 4096 header bytes of a new, empty image with today's default parameters
        (and pack_target: F.COMPACT_PACK_TARGET for the compact profile)."""
        header = Header(F.FORMAT_VERSION, uuid.uuid4().bytes, F.CHUNK_MIN, F.CHUNK_AVG,
                        F.CHUNK_MAX, pack_target)
        enc = header.encode()
        return enc + bytes(F.HEADER_SIZE - len(enc))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    # ---- root slots and commits ----------------------------------------------------------

    def read_slots(self) -> list[tuple[int, int, int, bytes] | None | str]:
        """Each slot as (generation, offset, length, xxh3_128), None if never written, or
        a string saying why it is invalid."""
        out: list[tuple[int, int, int, bytes] | None | str] = []
        for off in F.SLOT_OFFSETS:
            raw = os.pread(self.fd, F.SLOT_SIZE, off)
            if raw == bytes(F.SLOT_SIZE):
                out.append(None)
                continue
            if len(raw) < F.SLOT_SIZE:
                out.append("truncated")
                continue
            magic, gen, coff, clen, csum, _ = F.SLOT.unpack_from(raw)
            check = int.from_bytes(raw[F.SLOT.size:], "little")
            if magic != F.SLOT_MAGIC or check != xxhash.xxh3_64_intdigest(raw[: F.SLOT.size]):
                out.append("checksum mismatch")
                continue
            out.append((gen, coff, clen, csum))
        return out

    def read_commit(self) -> Commit:
        """The current state: the commit of the valid slot with the highest generation."""
        slots = [s for s in self.read_slots() if isinstance(s, tuple)]
        if not slots:
            if all(s is None for s in self.read_slots()):
                return Commit()
            raise CorruptImage(self.path, "no valid root slot in the header")
        # Never fall back past a valid slot: its commit is the current state, or damage.
        gen, coff, clen, csum = max(slots)
        try:
            return self.load_commit(gen, coff, clen, csum)
        except CorruptImage as e:
            raise CorruptImage(self.path, f"no readable commit: {e.detail()}") from None

    def load_commit(self, gen: int, coff: int, clen: int, csum: bytes) -> Commit:
        """The commit a slot points at, checked against the slot (verify checks both)."""
        where = f"commit at offset {coff}"
        size = self.size()
        if coff < F.HEADER_SIZE or clen > F.MAX_RAW[F.KIND_COMMIT] or coff + clen > size:
            raise CorruptImage(self.path, f"{where} lies outside the file ({size} bytes)")
        whole = os.pread(self.fd, clen, coff)
        if xxhash.xxh3_128_digest(whole) != csum:
            raise ChecksumMismatch(self.path, where)
        raw = self.read_frame(coff, F.KIND_COMMIT)
        commit = Commit.decode(raw, f"{self.path}: {where}", size)
        if commit.generation != gen:
            raise CorruptImage(self.path, f"{where} does not match its root slot")
        commit.data_end = coff + clen
        return commit

    # ---- frames --------------------------------------------------------------------------

    def frame_info(self, offset: int, kind: bytes | None = None) -> FrameInfo:
        """Read and check a frame header: its kind, and that it lies inside the file."""
        size = self.size()
        if offset < F.HEADER_SIZE or offset + F.FRAME_HEADER > size:
            raise CorruptImage(self.path, f"frame at offset {offset} lies outside the file "
                                          f"({size} bytes)")
        return self.parse_frame_header(os.pread(self.fd, F.FRAME_HEADER, offset), offset,
                                       size, kind)

    def parse_frame_header(self, raw: bytes, offset: int, size: int,
                           kind: bytes | None = None) -> FrameInfo:
        """Check the frame header raw, read at offset of a file of size bytes (a store's
        pack object is checked as a file holding that frame alone)."""
        where = f"frame at offset {offset}"
        magic, codec, stored, rawlen, check = F.FRAME.unpack_from(raw)
        if int.from_bytes(raw[F.FRAME.size:], "little") != xxhash.xxh3_64_intdigest(
                raw[: F.FRAME.size]):
            raise ChecksumMismatch(self.path, f"the header of the {where}")
        fkind = magic[3:]
        if magic[:3] != F.FRAME_MAGIC or fkind not in F.KINDS:
            raise CorruptImage(self.path, f"{where}: not a frame")
        if kind is not None and fkind != kind:
            raise CorruptImage(self.path, f"{where}: expected a {kind!r} frame, found {fkind!r}")
        if codec not in (F.CODEC_STORED, F.CODEC_ZSTD):
            raise CorruptImage(self.path, f"{where}: unknown codec {codec}")
        if rawlen > F.MAX_RAW[fkind]:
            raise CorruptImage(self.path, f"{where} claims {rawlen} bytes decompressed "
                                          f"(limit {F.MAX_RAW[fkind]})")
        if stored > rawlen + (rawlen >> 7) + 1024:
            raise CorruptImage(self.path, f"{where} claims {stored} stored bytes for "
                                          f"{rawlen} decompressed")
        if stored > size - offset - F.FRAME_HEADER:
            raise CorruptImage(self.path, f"{where} claims {stored} bytes, past the end "
                                          f"of the file ({size} bytes)")
        if codec == F.CODEC_STORED and stored != rawlen:
            raise CorruptImage(self.path, f"{where}: stored frame with two lengths")
        return FrameInfo(offset, fkind, codec, stored, rawlen, check)

    def read_frame(self, offset: int, kind: bytes | None = None) -> bytes:
        """The checked, decompressed payload of the frame at offset (bounded allocation)."""
        return self.read_frame_info(offset, kind)[1]

    def read_frame_info(self, offset: int, kind: bytes | None = None
                        ) -> tuple[FrameInfo, bytes]:
        """read_frame, with the frame's header (whose end is where the next frame is)."""
        info = self.frame_info(offset, kind)
        payload = os.pread(self.fd, info.stored, offset + F.FRAME_HEADER)
        return info, self.decode_payload(info, payload)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def read_stored(self, offset: int, kind: bytes) -> tuple[FrameInfo, bytes]:
        """The frame at offset as stored (still compressed), its checksum and sizes checked:
        what a copy of the frame into another file takes (export), without decompressing."""
        info = self.frame_info(offset, kind)
        payload = os.pread(self.fd, info.stored, offset + F.FRAME_HEADER)
        self._check_stored(info, payload)
        return info, payload

    def _check_stored(self, info: FrameInfo, payload: bytes) -> None:
        where = f"{_KIND_WORDS[info.kind]} at offset {info.offset}"
        if len(payload) != info.stored or xxhash.xxh3_64_intdigest(payload) != info.check:
            raise ChecksumMismatch(self.path, where)
        if info.codec != F.CODEC_STORED:
            try:
                size = zstandard.frame_content_size(payload)
            except zstandard.ZstdError as e:
                raise CorruptImage(self.path, f"{where}: not a zstd frame ({e})") from None
            if size != info.raw:
                raise CorruptImage(self.path, f"{where}: zstd frame size differs from header")

    def decode_payload(self, info: FrameInfo, payload: bytes) -> bytes:
        self._check_stored(info, payload)
        return self.decode_checked(info, payload)

    def decode_checked(self, info: FrameInfo, payload: bytes) -> bytes:
        """decode_payload of a payload read_stored returned (already checked)."""
        where = f"{_KIND_WORDS[info.kind]} at offset {info.offset}"
        if info.codec == F.CODEC_STORED:
            return payload
        try:
            raw = self._decompressor().decompress(payload, max_output_size=info.raw)
        except zstandard.ZstdError as e:
            raise CorruptImage(self.path, f"{where}: cannot decompress ({e})") from None
        if len(raw) != info.raw:
            raise CorruptImage(self.path, f"{where}: decompressed to {len(raw)} bytes, "
                                          f"header says {info.raw}")
        return raw

    def iter_frames(self, end: int) -> Iterator[FrameInfo]:
        """Every frame from the header to end, in file order (for verify)."""
        pos = F.HEADER_SIZE
        while pos < end:
            info = self.frame_info(pos)
            if info.end > end:
                raise CorruptImage(self.path, f"frame at offset {pos} runs past the "
                                              f"committed end ({end})")
            yield info
            pos = info.end

    # ---- writing -------------------------------------------------------------------------

    def lock(self, wait: float | None = None) -> None:
        """Take the writer lock; wait up to `wait` seconds (None: forever)."""
        if not flock_within(self.fd, wait, 0.05):
            raise Busy(self.path, "try again later, or pass --wait")
        self._still_named()

    def _still_named(self) -> None:
        """Refuse (and unlock) when path no longer names this file: `imagefs optimize`
        replaced it while this writer waited, and a commit into the old file is lost."""
        if self.unnamed:
            return
        mine = os.fstat(self.fd)
        try:
            now = os.stat(self.path)
            same = (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            same = False
        if not same:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            raise ImageReplaced(self.path)

    def begin_append(self, commit: Commit) -> None:
        """Start appending after the committed end, cutting a dead writer's leftovers."""
        assert self.writable
        if self.size() > commit.data_end:
            os.ftruncate(self.fd, commit.data_end)
        self._append_pos = commit.data_end

    @property
    def append_pos(self) -> int:
        assert self._append_pos is not None, "begin_append first"
        return self._append_pos

    def append_frame(self, kind: bytes, payload: bytes, raw_len: int, codec: int) -> int:
        """Append one frame (payload already compressed if codec says so); its offset."""
        head = F.FRAME.pack(F.FRAME_MAGIC + kind, codec, len(payload), raw_len,
                            xxhash.xxh3_64_intdigest(payload))
        head += xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
        off = self.append_pos
        self._pwrite_all(head + payload if len(payload) < 65536 else head, off)
        if len(payload) >= 65536:
            self._pwrite_all(payload, off + len(head))
        self._append_pos = off + len(head) + len(payload)
        return off

    def append_raw(self, kind: bytes, raw: bytes, level: int) -> int:
        """Compress raw with zstd at level and append it as a frame."""
        payload = compress(raw, level)
        return self.append_frame(kind, payload, len(raw), F.CODEC_ZSTD)

    def _pwrite_all(self, data: bytes, off: int) -> None:
        try:
            pwrite_all(self.fd, data, off)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SystemFailure(self.path, "no space left on device; the image is "
                                               "unchanged") from None
            raise SystemFailure(self.path, f"write failed: {e.strerror}") from None

    def publish(self, commit: Commit) -> None:
        """Append the commit frame and make it current with one slot write (see above).
        An unnamed file is seen by no one until it is linked, which fsyncs it first
        (export.link_unnamed): it needs no fsync here."""
        old = [s for s in self.read_slots() if isinstance(s, tuple)]
        gen = max((s[0] for s in old), default=0) + 1
        commit.generation = gen
        commit.created = now_iso()
        off = self.append_pos
        crash_point("before-commit-frame")
        self.append_raw(F.KIND_COMMIT, commit.encode(), 3)
        commit.data_end = self.append_pos
        crash_point("before-fsync")
        if not self.unnamed:
            os.fsync(self.fd)
        crash_point("before-slot")
        whole = os.pread(self.fd, commit.data_end - off, off)
        slot = F.SLOT.pack(F.SLOT_MAGIC, gen, off, len(whole), xxhash.xxh3_128_digest(whole),
                           bytes(8))
        slot += xxhash.xxh3_64_intdigest(slot).to_bytes(8, "little")
        self._pwrite_all(slot, F.SLOT_OFFSETS[gen % 2])
        self.slot_written = True
        if not self.unnamed:
            os.fsync(self.fd)
        crash_point("after-slot")


_KIND_WORDS = {F.KIND_PACK: "pack", F.KIND_META: "metadata block",
               F.KIND_TABLE: "chunk table", F.KIND_COMMIT: "commit record"}

_cctx = threading.local()  # this thread's compressors, by level; freed with the thread


def compress(raw: bytes, level: int) -> bytes:
    """zstd with the content size in the frame (readers check it against the header)."""
    return compressor(level).compress(raw)


def compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor for this thread and level (a ZstdCompressor is not shared by threads).
    Thread-local, so that a writer's worker threads take their contexts (~11 MB each at
    level 9) with them when they end, in a long-lived daemon as in one export."""
    mine: dict[int, zstandard.ZstdCompressor] | None = getattr(_cctx, "by_level", None)
    if mine is None:
        mine = _cctx.by_level = {}
    c = mine.get(level)
    if c is None:
        c = mine[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c
