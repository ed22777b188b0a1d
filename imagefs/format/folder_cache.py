"""A bounded folder of immutable blobs named by their content, shared by the processes of
one user: the store's cache of pack objects (imagefs.store.cache) and the decompressed
packs of servicing transactions (decoded.py).

Every file is written under a temporary name and renamed into place, so a reader never
sees half of one.  Files are evicted, oldest use first (mtime, refreshed on use), once they
hold more than `limit` bytes; a reader that still has an evicted file open keeps reading
it.  The folder is counted again every RESCAN_PUTS puts (others write to it too), so the
bound holds to within what other processes put meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import BinaryIO, cast

RESCAN_PUTS = 64  # puts between two counts of the folder: counting at every put made a
# fresh apply of web from a store (206 packs) spend 0.35 s in stat()


class FolderCache:
    """Blobs in folder/kind (mode 0700), at most about limit bytes of them."""

    def __init__(self, folder: str, limit: int, kind: str) -> None:
        self.folder = os.path.abspath(folder)  # a mount process chdirs to /
        self.limit = limit
        self.kind = kind
        os.makedirs(os.path.join(self.folder, kind), mode=0o700, exist_ok=True)
        # Bytes here, as last counted plus what this process put since, and how many puts
        # ago it was counted.
        self._lock = threading.Lock()
        self._bytes = 0
        self._since = RESCAN_PUTS

    def path(self, kind: str, name: str) -> str:
        return os.path.join(self.folder, kind, name)

    def get(self, name: str) -> bytes | None:
        """A blob's bytes, if kept (the caller checks them: the cache is only a copy)."""
        fh = self.open(name)
        if fh is None:
            return None
        with fh:
            return fh.read()

    def open(self, name: str, kind: str | None = None) -> BinaryIO | None:
        """A blob's file, unbuffered, if kept (in kind, this cache's own by default); marked
        used (evicted last)."""
        path = self.path(kind or self.kind, name)
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return cast(BinaryIO, fh)

    def has(self, name: str) -> bool:
        return os.path.exists(self.path(self.kind, name))

    def put(self, name: str, data: bytes) -> None:
        """Keep a blob; evict the oldest when they hold more than limit bytes."""
        self.write(self.kind, name, data)
        with self._lock:
            self._bytes += len(data)
            self._since += 1
            if self._since < RESCAN_PUTS and self._bytes <= self.limit:
                return
            self._since = 0
            self._bytes = self.evict()

    def write(self, kind: str, name: str, data: bytes) -> str:
        """data as folder/kind/name, whole or not at all."""
        folder = os.path.join(self.folder, kind)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".new-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return os.path.join(folder, name)

    def evict(self) -> int:
        """Remove the least recently used blobs until they hold at most limit bytes; the
        bytes left."""
        blobs = self._blobs()
        total = sum(size for _p, size, _t in blobs)
        for path, size, _t in sorted(blobs, key=lambda p: p[2]):
            if total <= self.limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total

    def _blobs(self) -> list[tuple[str, int, float]]:
        out = []
        with os.scandir(os.path.join(self.folder, self.kind)) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    out.append((entry.path, st.st_size, st.st_mtime))
        return out
