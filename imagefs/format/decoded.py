"""Decompressed packs kept for the next servicing transaction on the machine.

A transaction's mount is new each time, so the packs dpkg and the libraries it runs on
read (about 35 for `package add` of hello; 74 when ldconfig reads the head of every shared
library) were decompressed again by every transaction, ~1.4 ms each, while dpkg waited.
Kept here, under the run directory (gone at reboot), a later transaction, or its plan made
beside the mount, reads them back instead (~0.5 ms with the name's hash).

A file is named by the SHA-256 of the pack frame's stored (compressed) bytes: the same pack
in a copy of the image, or in another image, is the same file, and no other bytes can
claim its name.  It holds the decompressed bytes and their xxh3-128, checked when it is
read back; the chunks are still checked against the index's own xxh3-128 as they are read
(packs.PackReader), as for every pack.  The folder is the user's (0700), bounded by
LIMIT, and never more than a quarter of what its filesystem has free; a folder that is not
the user's own, or that others may write, is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import xxhash

from imagefs.places import run_dir

from .folder_cache import FolderCache

LIMIT = 256 << 20
CHECK = 16  # bytes of xxh3-128 after the decompressed bytes


class DecodedPacks(FolderCache):
    """Decompressed packs, by the SHA-256 of their stored bytes."""

    def __init__(self, folder: str | None = None, limit: int = LIMIT) -> None:
        super().__init__(folder or os.path.join(run_dir(), "decoded"), limit, "packs")
        for path in (self.folder, os.path.join(self.folder, self.kind)):
            st = os.lstat(path)  # not one another user made for us to read from
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not os.path.isdir(path) \
                    or os.path.islink(path):
                raise PermissionError(f"{path}: not this user's own folder")
        fs = os.statvfs(self.folder)
        self.limit = min(limit, fs.f_bavail * fs.f_frsize // 4)

    @staticmethod
    def name(stored: bytes) -> str:
        return hashlib.sha256(stored).hexdigest()

    def load(self, name: str, size: int) -> bytes | None:
        """The decompressed pack kept as name, if it is whole (size bytes, its check).
        Read as two parts, the bytes and their check, so that the bytes are not copied
        again (a tenth of a transaction's reads of kept packs)."""
        try:
            fh = self.open(name)
            if fh is None:
                return None
            with fh:
                raw, check = fh.read(size), fh.read(CHECK + 1)
        except OSError:
            return None
        if len(raw) != size or check != xxhash.xxh3_128_digest(raw):
            return None
        return raw

    def keep(self, name: str, raw: bytes) -> None:
        """Keep a decompressed pack; a cache that cannot take it (full, gone) is skipped."""
        with contextlib.suppress(OSError):
            self.put(name, raw + xxhash.xxh3_128_digest(raw))


def decoded_packs() -> DecodedPacks | None:
    """This user's kept packs; None when the folder cannot be made (then nothing is kept)."""
    try:
        return DecodedPacks()
    except OSError:
        return None
