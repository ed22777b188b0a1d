"""Capture: walk a directory tree into PendingInodes, its content into chunks and packs.

The walk records every inode's full Linux metadata (lstat, xattrs incl. ACLs and
security.capability, symlink targets, device numbers, hardlinks within the tree) and
streams each regular file's data regions (holes skipped with SEEK_DATA/SEEK_HOLE) through
FastCDC into the PackWriter, which stores each distinct chunk once.  `writer.write_tree`
then turns the PendingInode tree into metadata records.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from pyfastcdc.cy import FastCDC

from imagefs.format import layout as F
from imagefs.format.chunking import chunk_region, file_data
from imagefs.format.packs import ChunkLoc, PackWriter
from imagefs.format.records import Inode
from imagefs.format.writer import PendingInode

from .content_class import HEAD, order_key
from .errors import SourceError, UsageError


def read_xattrs(path: str | bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    out = []
    for name in sorted(names):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        out.append((os.fsencode(name), value))
    return out


class TreeCapture:
    """Reads one source tree into a PendingInode tree, feeding file content to a PackWriter."""

    def __init__(self, packs: PackWriter, chunk_min: int, chunk_avg: int, chunk_max: int,
                 progress: Callable[[int], None] | None = None,
                 skip: tuple[int, int] | None = None) -> None:
        self.packs = packs
        self.cdc = FastCDC(avg_size=chunk_avg, min_size=chunk_min, max_size=chunk_max)
        self.chunk_min = chunk_min
        self.progress = progress
        self.skip = skip  # (st_dev, st_ino) of the image file itself, if inside the source
        self._links: dict[tuple[int, int], PendingInode] = {}

    def scan(self, src: str) -> tuple[PendingInode, int]:
        """Walk src; return the root PendingInode and the total bytes of regular files."""
        try:
            st = os.lstat(src)
        except OSError as e:
            raise SourceError(src, e.strerror) from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{src}: the source must be a directory")
        root = self._node(os.fsencode(src), st)
        total = 0
        stack = [(os.fsencode(src), root)]
        while stack:
            path, node = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = sorted((e.name, e) for e in it)
            except OSError as e:
                raise SourceError(os.fsdecode(path), e.strerror) from None
            if self.progress:  # no bytes yet, but a chance to stop (a cancelled job)
                self.progress(0)
            children = []
            for name, entry in entries:
                child_path = entry.path
                try:
                    cst = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise SourceError(os.fsdecode(child_path), e.strerror) from None
                if self.skip and (cst.st_dev, cst.st_ino) == self.skip:
                    continue
                key = (cst.st_dev, cst.st_ino)
                shared = self._links.get(key) if not stat.S_ISDIR(cst.st_mode) else None
                if shared is not None:
                    shared.ino.nlink += 1
                    children.append((name, shared))
                    continue
                child = self._node(child_path, cst)
                if cst.st_nlink > 1 and not stat.S_ISDIR(cst.st_mode):
                    self._links[key] = child
                if child.ino.kind == F.DIR:
                    stack.append((child_path, child))
                elif child.ino.kind == F.REG:
                    child.source = child_path
                    total += cst.st_size
                children.append((name, child))
            node.children = children
        return root, total

    def _node(self, path: bytes, st: os.stat_result) -> PendingInode:
        kind = F.KIND_OF_MODE[stat.S_IFMT(st.st_mode)]
        try:
            xattrs = read_xattrs(path)
            target = os.readlink(path) if kind == F.LNK else b""
        except OSError as e:
            raise SourceError(os.fsdecode(path), e.strerror) from None
        if len(target) > F.MAX_SYMLINK or any(len(v) > F.MAX_XATTR_VALUE for _, v in xattrs):
            raise SourceError(os.fsdecode(path), "symlink target or xattr value too large")
        ino = Inode(kind=kind, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, nlink=1,
                    size=len(target) if kind == F.LNK else
                    (st.st_size if kind == F.REG else 0),
                    rdev=st.st_rdev if kind in (F.CHR, F.BLK) else 0,
                    mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns, ctime_ns=st.st_ctime_ns,
                    xattrs=xattrs, target=target)
        node = PendingInode(ino)
        if kind == F.REG:
            node.sparse_hint = st.st_blocks * 512 < st.st_size
        return node

    def read_contents(self, root: PendingInode, grouped: bool = False) -> None:
        """Chunk and store the content of every regular file under root (each inode once),
        in the order tar, cp -a and find walk a tree (depth first, names in order): a
        reader of the whole mounted tree then goes through the packs front to back.
        grouped (the compact profile): like content together instead (content_class)."""
        files = self._walk_files(root)
        if grouped:
            files.sort(key=lambda named: order_key(named[0], self._head(named[1])))
        for _name, node in files:
            self._read_file(node)

    @staticmethod
    def _walk_files(root: PendingInode) -> list[tuple[bytes, PendingInode]]:
        """The regular files under root in walk order, each inode once, with its name."""
        seen: set[int] = set()
        files = []
        stack = [iter(root.children or [])]
        while stack:
            for name, child in stack[-1]:
                if child.ino.kind == F.DIR:
                    stack.append(iter(child.children or []))
                    break
                if child.ino.kind == F.REG and id(child) not in seen:
                    seen.add(id(child))
                    files.append((name, child))
            else:
                stack.pop()
        return files

    def _head(self, node: PendingInode) -> bytes:
        """The first bytes of a file (for its kind); b"" if it cannot be read now (reading
        its content says why)."""
        assert node.source is not None
        try:
            fd = os.open(node.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK)
        except OSError:
            return b""
        try:
            return os.pread(fd, HEAD, 0)
        except OSError:
            return b""
        finally:
            os.close(fd)

    def _read_file(self, node: PendingInode) -> None:
        path = node.source
        assert path is not None
        # O_NONBLOCK: a file swapped for a FIFO since the scan must not hang the capture.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags | os.O_NOATIME)
        except PermissionError:
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise SourceError(os.fsdecode(path), e.strerror) from None
        except OSError as e:
            raise SourceError(os.fsdecode(path), e.strerror) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(os.fsdecode(path), "no longer a regular file (it changed "
                                                     "while being captured)")
            os.set_blocking(fd, True)
            size = st.st_size
            node.ino.size = size
            for start, end in self._regions(fd, size, node.sparse_hint):
                self._read_region(fd, start, end, node)
        except OSError as e:
            raise SourceError(os.fsdecode(path), e.strerror) from None
        finally:
            os.close(fd)
        node.source = None

    @staticmethod
    def _regions(fd: int, size: int, sparse: bool) -> list[tuple[int, int]]:
        if size == 0:
            return []
        if not sparse:
            return [(0, size)]
        return list(file_data(fd, 0, size))

    def _read_region(self, fd: int, start: int, end: int, node: PendingInode) -> None:
        node.locs.extend(chunk_region(lambda off, n: os.pread(fd, n, off), start, end,
                                      self.cdc, self.chunk_min, self._store,
                                      self._progressed))

    def _store(self, data: bytes | memoryview) -> ChunkLoc:
        return self.packs.add_chunk(data)

    def _progressed(self, n: int) -> None:
        if self.progress:
            self.progress(n)
