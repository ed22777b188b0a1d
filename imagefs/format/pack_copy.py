"""Copying packs from one image file into another as they are stored (export, optimize).

A copied pack is not recompressed: its frame moves byte for byte, so its chunks keep their
offsets, lengths and checksums and only the pack id (the frame's offset) changes.  The frame
checksum is checked as the frame is read, so a damaged pack is refused, never copied.

With check_chunks (export/optimize --check), each copied pack is also decompressed on a
worker thread and every chunk's xxh3-128 checked against the source's chunk table, so that
a pack whose frame checksum was recomputed over altered content is refused too.  That
costs a decompression of everything copied (about as long as the rest of an export), and
a reader of the destination checks each chunk as it reads it anyway, so it is asked for,
as `wimexport --check` is.  `finish()` waits for those checks: call it before publishing.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from imagefs.errors import ChecksumMismatch, CorruptImage

from . import layout as F
from .container import FrameInfo, ImageFile
from .packs import ChunkLoc, ChunkTable


class PackCopier:
    """Copies packs of src into out and adds their chunks to table (out's)."""

    MAX_PENDING = 2  # packs copied but not yet checked (memory: their stored bytes)

    def __init__(self, src: ImageFile, out: ImageFile, table: ChunkTable,
                 check_chunks: bool = False) -> None:
        self.src = src
        self.out = out
        self.table = table
        self._pool = ThreadPoolExecutor(max_workers=1) if check_chunks else None
        self._pending: list[Future[None]] = []
        self.stored_bytes = 0  # their frames' bytes, headers included

    def copy(self, pack: int, chunks: list[ChunkLoc]) -> list[ChunkLoc]:
        """Copy the pack at offset pack, whose chunks (as src's table lists them) are
        chunks; their new locations, in the same order."""
        info, payload = self.src.read_stored(pack, F.KIND_PACK)
        for c in chunks:
            if c.offset + c.length > info.raw:
                raise CorruptImage(self.src.path, f"chunk {c.xxh.hex()} lies past the end "
                                                  f"of its pack at offset {pack}")
        at = self.out.append_frame(F.KIND_PACK, payload, info.raw, info.codec)
        if self._pool is not None:
            self._pending.append(self._pool.submit(self._check, info, payload, chunks))
            while len(self._pending) > self.MAX_PENDING:
                self._pending.pop(0).result()
        self.stored_bytes += F.FRAME_HEADER + len(payload)
        moved = [ChunkLoc(at, c.offset, c.length, c.xxh, c.sha) for c in chunks]
        for loc in moved:
            self.table.add(loc)
        return moved

    def _check(self, info: FrameInfo, payload: bytes, chunks: list[ChunkLoc]) -> None:
        raw = self.src.decode_payload(info, payload)
        view = memoryview(raw)
        for c in chunks:
            if c.offset + c.length > len(raw):
                raise CorruptImage(self.src.path, f"chunk {c.xxh.hex()} lies past the end "
                                                  f"of its pack at offset {info.offset}")
            if xxhash.xxh3_128_digest(view[c.offset:c.offset + c.length]) != c.xxh:
                raise ChecksumMismatch(self.src.path, f"chunk {c.xxh.hex()} of the pack at "
                                                      f"offset {info.offset}")

    def finish(self) -> None:
        """Wait for every check; the first failure raises (nothing may be published)."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self.abort()

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
