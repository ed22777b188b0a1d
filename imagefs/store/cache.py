"""A bounded local cache of a store's objects, shared by every reader on the machine.

Reading an index straight from a store (ls, cat, apply, mount) fetches its bundle once and
its packs as they are read.  They are kept here, named by their SHA-256 as in the store, so
a second mount or apply reuses them: `DIR/bundles/SHA256.imagefs` and `.packs` (a
bundle's file and pack list), `DIR/packs/SHA256`.  Every file is written under a temporary
name and renamed into place, so a reader never sees half of one; every pack read from here
is checked against its name again (the cache is only a copy).  Packs are evicted, oldest
use first (mtime, refreshed on use), once they hold more than `limit` bytes; a reader that
still has an evicted file open keeps reading it.  Bundles are small and stay.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
import threading

DEFAULT_LIMIT = 2 << 30


def default_folder() -> str:
    """$IMAGEFS_CACHE, else /var/cache/imagefs/store for root, ~/.cache/imagefs/store (the
    home of the user this process is, not $HOME: the daemon's fork server becomes its
    caller without the caller's environment)."""
    env = os.environ.get("IMAGEFS_CACHE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/imagefs/store"
    return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "imagefs", "store")


RESCAN_PUTS = 64  # puts between two counts of the packs folder (others write to it too)


class StoreCache:
    def __init__(self, folder: str | None = None, limit: int = DEFAULT_LIMIT) -> None:
        self.folder = os.path.abspath(folder or default_folder())  # a mount process chdirs to /
        self.limit = limit
        for sub in ("packs", "bundles"):
            os.makedirs(os.path.join(self.folder, sub), mode=0o700, exist_ok=True)
        # Bytes of packs here, as last counted plus what this process put since, and how
        # many puts ago it was counted: counting the folder at every put made a fresh
        # apply of web (206 packs) spend 0.35 s in stat() (1.5 s once 2 GiB are cached).
        self._lock = threading.Lock()
        self._bytes = 0
        self._since = RESCAN_PUTS

    def path(self, kind: str, name: str) -> str:
        return os.path.join(self.folder, kind, name)

    def get(self, sha: str) -> bytes | None:
        """A pack object's bytes, if cached (the caller checks them against sha)."""
        path = self.path("packs", sha)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used: evicted last
        return data

    def has(self, sha: str) -> bool:
        return os.path.exists(self.path("packs", sha))

    def put(self, sha: str, data: bytes) -> None:
        """Keep a pack; evict the oldest when the packs hold more than limit bytes.  The
        folder is counted again every RESCAN_PUTS puts, and whenever this process's tally
        says the limit is passed, so other processes' packs are seen too (a little late:
        the bound holds to within what they put meanwhile)."""
        self.write("packs", sha, data)
        with self._lock:
            self._bytes += len(data)
            self._since += 1
            if self._since < RESCAN_PUTS and self._bytes <= self.limit:
                return
            self._since = 0
            self._bytes = self.evict()

    def write(self, kind: str, name: str, data: bytes) -> str:
        """data as DIR/kind/name, whole or not at all."""
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
        """Remove the least recently used packs until they hold at most limit bytes; the
        bytes left."""
        packs = self._packs()
        total = sum(size for _p, size, _t in packs)
        for path, size, _t in sorted(packs, key=lambda p: p[2]):
            if total <= self.limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total

    def _packs(self) -> list[tuple[str, int, float]]:
        out = []
        with os.scandir(os.path.join(self.folder, "packs")) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    out.append((entry.path, st.st_size, st.st_mtime))
        return out
