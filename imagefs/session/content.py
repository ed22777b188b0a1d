"""The bytes of files in a writable mount: write, truncate and fallocate.

A new file keeps its bytes inline (in its staging row) while it is small; a larger one,
and any base file that is written, has a sparse data file in staging.  The first write
into a base file copies up only the base chunks it touches; the file's staged ranges say
which bytes are the data file's, the rest still reads from the base below base_limit.
Its own module because this is the one part of the tree that moves file data.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

from imagefs.format import layout as F
from imagefs.format.files import pwrite_all, start_writeback
from imagefs.format.view import overlapping
from imagefs.mount.tree import Refusal

from .changes import TreeChanges
from .ranges import Ranges
from .staging import StagedInode

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_FILE_SIZE = 1 << 62
INLINE_MAX = 64 * 1024  # a new file this small keeps its bytes in its staging row
INLINE_TOTAL = 64 << 20  # ... while all such bytes stay under this
# A write this large (the kernel's writeback cache sends a sequential writer's pages in
# 1 MiB requests) starts its way to disk at once in a durable session: fio writing 256 MiB
# then fsync, 760-812 -> 867-948 MiB/s (3 runs each; fuse-overlayfs ~800).  Small writes
# (a database's, dbench's) are left to the kernel, as is everything in a volatile session,
# which never reaches the disk on purpose.
WRITEBACK_FROM = 512 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileContent(TreeChanges):
    """File content: inline bytes, copy-up, fallocate, truncate."""

    def file_for_change(self, ino: int) -> StagedInode:
        node = self._own(ino)
        if node.kind != F.REG:
            raise Refusal(errno.EISDIR if node.kind == F.DIR else errno.EINVAL,
                          "not a regular file")
        return node

    def _copy_up(self, node: StagedInode, start: int, end: int) -> None:
        """Before [start, end) of a base file changes: copy the base chunks it touches
        (the parts of them outside [start, end)) into the data file, and stage them."""
        if node.is_new or start >= node.base_limit:
            return
        if node.staged is None:
            node.staged = Ranges()
        staged = node.staged
        base = self._base_inode(node)
        fd = self.st.data_fd(node.ino)
        lo, hi = start, end
        for foff, _p, _o, length, _x in overlapping(base, start, min(end, node.base_limit)):
            c0, c1 = foff, min(foff + length, node.base_limit)
            for g0, g1 in staged.gaps(c0, c1):
                for a, b in ((g0, min(g1, start)), (max(g0, end), g1)):
                    if a < b:
                        pwrite_all(fd, bytes(self.view.read(base, a, b - a)), a)
            lo, hi = min(lo, c0), max(hi, c1)
        staged.add(lo, hi)
        self.st.wrote(node.ino)

    def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset + len(data) > MAX_FILE_SIZE:
            raise Refusal(errno.EFBIG, "file too large")
        node = self.file_for_change(ino)
        end = offset + len(data)
        if node.inline is not None and not self._fits_inline(node, max(end, node.size)):
            self._spill(node)
        if node.inline is not None:
            self._resize_inline(node, max(end, len(node.inline)))
            node.inline[offset:end] = data
        else:
            self._copy_up(node, offset, end)
            fd = self.st.data_fd(ino)
            pwrite_all(fd, data, offset)
            if len(data) >= WRITEBACK_FROM and not self.st.volatile:
                start_writeback(fd, offset, len(data))
        self._wrote(node, offset, end)
        return len(data)

    def _wrote(self, node: StagedInode, offset: int, end: int) -> None:
        """Bookkeeping of bytes written at [offset, end)."""
        if node.inline is None:
            self.st.wrote(node.ino)
        if not node.is_new:
            assert node.staged is not None or offset >= node.base_limit
            if node.staged is None:
                node.staged = Ranges()
            node.staged.add(offset, end)
        old = node.size
        node.size = max(node.size, end)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self._count_size(node, old)
        self._changed(node)

    def _fits_inline(self, node: StagedInode, size: int) -> bool:
        assert node.inline is not None
        return size <= INLINE_MAX and self.inline_bytes + size - len(node.inline) \
            <= INLINE_TOTAL

    def _resize_inline(self, node: StagedInode, size: int) -> None:
        assert node.inline is not None
        self.inline_bytes += size - len(node.inline)
        if size > len(node.inline):
            node.inline.extend(bytes(size - len(node.inline)))
        else:
            del node.inline[size:]

    def _spill(self, node: StagedInode) -> None:
        """A new file outgrew its inline bytes: they move into a data file."""
        assert node.inline is not None
        fd = self.st.data_fd(node.ino)
        os.ftruncate(fd, 0)
        pwrite_all(fd, node.inline, 0)
        self.st.wrote(node.ino)
        self.inline_bytes -= len(node.inline)
        node.inline = None

    def truncate(self, node: StagedInode, size: int) -> None:
        if size < 0 or size > MAX_FILE_SIZE:
            raise Refusal(errno.EINVAL if size < 0 else errno.EFBIG, "size")
        if node.inline is not None:
            if self._fits_inline(node, size):
                self._resize_inline(node, size)
            else:
                self._spill(node)
        old = node.size
        if size < old:
            if self.st.has_data(node.ino):
                os.ftruncate(self.st.data_fd(node.ino), size)
                self.st.wrote(node.ino)
            if node.staged is not None:
                node.staged.cut(size)
            node.base_limit = min(node.base_limit, size)
        node.size = size
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self._count_size(node, old)
        self._changed(node)

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        if offset < 0 or length <= 0:
            raise Refusal(errno.EINVAL, "offset or length")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise Refusal(errno.EOPNOTSUPP, "fallocate mode")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise Refusal(errno.EINVAL, "punching a hole needs KEEP_SIZE")
        node = self.file_for_change(ino)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise Refusal(errno.EFBIG, "file too large")
        if node.inline is not None and not (mode & FALLOC_FL_KEEP_SIZE) \
                and not self._fits_inline(node, max(end, node.size)):
            self._spill(node)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            zero_end = min(end, node.size)
            if node.inline is not None:
                if offset < zero_end:
                    node.inline[offset:zero_end] = bytes(zero_end - offset)
            elif offset < zero_end:
                self._copy_up(node, offset, zero_end)
                fd = self.st.data_fd(ino)
                _punch(fd, offset, zero_end - offset)
                self.st.wrote(ino)
                if not node.is_new:
                    if node.staged is None:
                        node.staged = Ranges()
                    node.staged.add(offset, zero_end)
            node.mtime_ns = node.ctime_ns = time.time_ns()
        if not mode & FALLOC_FL_KEEP_SIZE and end > node.size:
            old = node.size
            if node.inline is not None:
                self._resize_inline(node, end)
            node.size = end
            node.ctime_ns = time.time_ns()
            self._count_size(node, old)
        self._changed(node)

    def open_truncating(self, ino: int) -> None:
        node = self.file_for_change(ino)
        if node.size:
            self.truncate(node, 0)

    def fsync(self, ino: int | None = None) -> None:
        """fsync and fsyncdir: the staging made durable.  A volatile staging (a servicing
        transaction's) has nothing to make durable, since a crash discards it whole: its
        fsync answers at once (as eatmydata would), and the interval's sync still writes."""
        if not self.st.volatile:
            self.st.sync(durable=True)
