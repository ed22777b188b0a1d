"""Content-defined chunking: cutting a byte range into chunks (FastCDC) in bounded memory,
and finding a file's data regions (SEEK_DATA/SEEK_HOLE) so holes are never read.

Capture and a session's commit both chunk this way, so a file written through a writable
mount deduplicates against the same file captured from a directory.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .packs import ChunkLoc

if TYPE_CHECKING:  # its import costs a mount (which only finds data regions) 8 ms
    from pyfastcdc.cy import FastCDC

WINDOW = 8 << 20  # bytes read at a time


def chunk_region(read: Callable[[int, int], bytes | memoryview], start: int, end: int,
                 cdc: FastCDC, chunk_min: int,
                 store: Callable[[bytes | memoryview], ChunkLoc],
                 progressed: Callable[[int], None] | None = None) -> list[tuple[int, ChunkLoc]]:
    """Cut bytes [start, end) (read(offset, n) gives them) into content-defined chunks and
    store each; returns (file offset, location) per chunk.  Reads WINDOW bytes at a time,
    carrying the unfinished last chunk over, so a region of any size takes bounded memory."""
    locs: list[tuple[int, ChunkLoc]] = []
    if end - start <= chunk_min:
        data = read(start, end - start)
        if data:
            locs.append((start, store(data)))
            if progressed:
                progressed(len(data))
        return locs
    carry = b""
    pos = start  # file offset of carry[0]
    read_at = start
    while read_at < end:
        block = read(read_at, min(WINDOW, end - read_at))
        if not block:
            break  # the file shrank while we read it: keep what was there
        read_at += len(block)
        buf = carry + block if carry else block
        last = read_at >= end
        chunks = list(cdc.cut_buf(buf))
        keep = chunks.pop() if not last and chunks else None
        for c in chunks:
            locs.append((pos + c.offset, store(c.data)))
        consumed = keep.offset if keep is not None else len(buf)
        if progressed:
            progressed(consumed)
        carry = bytes(buf[consumed:]) if keep is not None else b""
        pos += consumed
    if carry:
        locs.append((pos, store(carry)))
        if progressed:
            progressed(len(carry))
    return locs


def file_data(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) of each data region (not hole) of an open file within [start, end),
    by SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            s = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if s >= end:
            return
        stop = min(os.lseek(fd, s, os.SEEK_HOLE), end)
        if stop > s:
            yield s, stop
        pos = stop
