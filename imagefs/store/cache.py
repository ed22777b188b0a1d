"""A bounded local cache of a store's objects, shared by every reader on the machine.

Reading an index straight from a store (ls, cat, apply, mount) fetches its bundle once and
its packs as they are read.  They are kept here, named by their SHA-256 as in the store, so
a second mount or apply reuses them: `DIR/bundles/SHA256.imagefs` and `.packs` (a
bundle's file and pack list), `DIR/packs/SHA256`, in a FolderCache (written whole or not
at all; packs evicted oldest use first beyond `limit` bytes).  Every pack read from here is
checked against its name again (the cache is only a copy).  Bundles are small and stay.
"""

from __future__ import annotations

import os
import pwd

from imagefs.format.folder_cache import FolderCache

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


class StoreCache(FolderCache):
    """A store's packs (named by their SHA-256, as in the store) and bundles."""

    def __init__(self, folder: str | None = None, limit: int = DEFAULT_LIMIT) -> None:
        super().__init__(folder or default_folder(), limit, "packs")
        os.makedirs(os.path.join(self.folder, "bundles"), mode=0o700, exist_ok=True)
