"""Compressing a commit's new content before the commit, while something else runs.

A servicing transaction knows much of what its commit will store before the commit starts:
the files of the packages it installs.  Compressing them at a servicing commit's level
(zstd 18) is most of that commit's time, and while dpkg runs in the session one CPU is
idle.  CompressAhead cuts those files into chunks exactly as a commit does
(chunking.chunk_region, the image's chunk sizes), leaves out the chunks the image already
stores, and compresses the rest into packs on a thread of its own.  The commit is offered
the packs (PackWriter.offer): it writes a pack as it is when it stores every chunk in it,
and compresses anything else itself, so content that never lands in the tree (a file
dpkg's path-exclude drops) costs a little work and never a byte of the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable

import zstandard

from .chunking import chunk_region
from .container import ImageFile
from .packs import ChunkLoc, ChunkTable, PrecompressedPack, fast_hash

log = logging.getLogger("imagefs.ahead")
BUDGET = 64 << 20  # raw bytes compressed ahead at most: past them the commit does the rest
# The level's strategy and shortest match (at 18: btultra and 3-byte matches, what makes 18
# ~5 % smaller than 17 on programs and libraries), with smaller match tables and a shorter
# search than the level's own: jq and its two libraries 384.2 -> 386.0 KB, and 160-210 ->
# 100 ms of CPU (hello 52.2 KB either way).  Beside dpkg, the level's own took ~330 ms of
# CPU, and jq's commit waited 60-95 ms for its last pack.
TABLES_LOG = 18  # chain and hash tables (the level's: 21)
SEARCH_LOG = 4  # (6)
TARGET_LENGTH = 32  # (64)


class CompressAhead:
    """Packs of contents(), compressed on a thread from start() until packs() is asked."""

    def __init__(self, image_path: str, level: int,
                 contents: Callable[[], Iterable[bytes]], budget: int = BUDGET) -> None:
        self.image_path = image_path
        self.level = level
        self.contents = contents
        self.budget = budget
        self._packs: list[PrecompressedPack] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagefs-compress-ahead",
                                        daemon=True)

    def start(self) -> CompressAhead:
        self._thread.start()
        return self

    def packs(self) -> list[PrecompressedPack]:
        """Every pack, once all are compressed: what the commit stores must not depend on
        how far this thread got (the image's growth would)."""
        self._thread.join()
        return list(self._packs)

    def stop(self) -> None:
        """Give up (the change failed): the pack being compressed is waited for."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # the CPU no one else wants: nice 19, this thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._compress_all()
        except Exception as e:  # a guess that failed costs nothing: the commit compresses
            log.warning("compressing ahead stopped: %s", e)

    def _compress_all(self) -> None:
        # Imported here, on this thread: pyfastcdc costs the verb ~3.5 ms where it starts
        # this, just before dpkg runs.
        from pyfastcdc.cy import FastCDC

        with ImageFile.open(self.image_path) as image:
            header = image.header
            table = ChunkTable.load(image, image.read_commit())
        cdc = FastCDC(avg_size=header.chunk_avg, min_size=header.chunk_min,
                      max_size=header.chunk_max)
        raw = bytearray()
        chunks: list[tuple[int, int, bytes, bytes]] = []
        seen: set[bytes] = set()
        taken = 0

        def store(data: bytes | memoryview) -> ChunkLoc:
            nonlocal raw, chunks
            xxh, sha = fast_hash(data), hashlib.sha256(data).digest()
            if xxh + sha not in seen and table.find(xxh, sha) is None:
                seen.add(xxh + sha)
                chunks.append((len(raw), len(data), xxh, sha))
                raw.extend(data)
                if len(raw) >= header.pack_target:  # packs of a commit's size
                    self._seal(bytes(raw), chunks)
                    raw, chunks = bytearray(), []
            return _UNUSED

        for content in self.contents():
            if self._stop.is_set() or taken + len(content) > self.budget:
                break
            taken += len(content)
            chunk_region(_reader(content), 0, len(content), cdc, header.chunk_min, store)
        if raw and not self._stop.is_set():  # over budget too: what was taken, whole
            self._seal(bytes(raw), chunks)

    def _seal(self, raw: bytes, chunks: list[tuple[int, int, bytes, bytes]]) -> None:
        self._packs.append(PrecompressedPack(raw, ahead_compressor(self.level, len(raw))
                                             .compress(raw), chunks))


def ahead_compressor(level: int, size: int) -> zstandard.ZstdCompressor:
    """A compressor of size bytes at level, its tables and search cut (TABLES_LOG...)."""
    own = zstandard.ZstdCompressionParameters.from_level(level, source_size=size)
    return zstandard.ZstdCompressor(compression_params=(
        zstandard.ZstdCompressionParameters.from_level(
            level, source_size=size, chain_log=min(own.chain_log, TABLES_LOG),
            hash_log=min(own.hash_log, TABLES_LOG), search_log=min(own.search_log, SEARCH_LOG),
            target_length=min(own.target_length, TARGET_LENGTH), write_content_size=1)))


def _reader(content: bytes) -> Callable[[int, int], memoryview]:
    view = memoryview(content)
    return lambda offset, n: view[offset:offset + n]


_UNUSED = ChunkLoc(0, 0, 0, b"", b"")  # what chunk_region's store returns here: not kept
