"""Decompressed packs kept for the next servicing transaction on the machine.

A transaction's mount is new each time, so the packs dpkg and the libraries it runs on
read (about 50 for `package add` of hello; 74 when ldconfig reads the head of every shared
library) were decompressed again by every transaction, ~1 ms each, while dpkg waited.
Kept here, under the run directory (gone at reboot), a later transaction, or its plan made
beside the mount, maps them instead.

A kept pack is named by the SHA-256 of the pack frame's stored (compressed) bytes: the same
pack in a copy of the image, or in another image, is the same file, and no other bytes can
claim its name.  Finding it by that name means reading and hashing the stored bytes
(~0.3 ms a pack, and a read from disk when they are no longer cached), so each image file
also leaves a *place* beside it: a symlink named by where the frame lies (the file's device
and inode, the frame's offset, its stored bytes' xxh3-64 and its sizes) to the kept pack.
A reader of the same file finds the pack by its place without reading the frame at all,
and maps it (mmap) rather than reading it: only the pages of the chunks it reads are
touched.

Nothing kept is trusted: every chunk read from a kept pack is checked against the index's
own xxh3-128 (packs.PackReader, as for every pack), and a pack one of whose chunks fails is
dropped from here and decompressed from the image again.  So a place that outlived its file
(an inode number used again, a frame rewritten in place with the same check) can at worst
make a read fail its check and decompress, never return other bytes.  The folder is the
user's (0700), bounded by LIMIT, and never more than a quarter of what its filesystem has
free; a folder that is not the user's own, or that others may write, is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat

from imagefs.places import run_dir

from .folder_cache import FolderCache

LIMIT = 256 << 20
PLACES = "places"  # symlinks by where a frame lies, to the kept packs


class DecodedPacks(FolderCache):
    """Decompressed packs, by the SHA-256 of their stored bytes, and by place."""

    def __init__(self, folder: str | None = None, limit: int = LIMIT) -> None:
        super().__init__(folder or os.path.join(run_dir(), "decoded"), limit, "packs")
        os.makedirs(os.path.join(self.folder, PLACES), mode=0o700, exist_ok=True)
        for path in (self.folder, os.path.join(self.folder, self.kind),
                     os.path.join(self.folder, PLACES)):
            st = os.lstat(path)  # not one another user made for us to read from
            if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not os.path.isdir(path) \
                    or os.path.islink(path):
                raise PermissionError(f"{path}: not this user's own folder")
        fs = os.statvfs(self.folder)
        self.limit = min(limit, fs.f_bavail * fs.f_frsize // 4)

    @staticmethod
    def name(stored: bytes) -> str:
        return hashlib.sha256(stored).hexdigest()

    @staticmethod
    def place(file: os.stat_result, offset: int, check: int, stored: int, raw: int) -> str:
        """The name of a frame's place: the image file (device, inode), where the frame
        lies, and what its header says of it."""
        where = f"{file.st_dev}:{file.st_ino}:{offset}:{check}:{stored}:{raw}"
        return hashlib.sha256(where.encode()).hexdigest()

    def load(self, name: str, size: int) -> mmap.mmap | None:
        """The decompressed pack kept as name, mapped, if it has size bytes."""
        return self._mapped(name, self.kind, size)

    def load_at(self, place: str, size: int) -> mmap.mmap | None:
        """The decompressed pack a place leads to, mapped, if it has size bytes."""
        return self._mapped(place, PLACES, size)

    def _mapped(self, name: str, kind: str, size: int) -> mmap.mmap | None:
        try:
            fh = self.open(name, kind)
            if fh is None:
                return None
            with fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size != size or size == 0:
                    return None
                return mmap.mmap(fh.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return None

    def keep(self, name: str, raw: bytes) -> None:
        """Keep a decompressed pack; a cache that cannot take it (full, gone) is skipped."""
        with contextlib.suppress(OSError):
            self.put(name, raw)

    def remember(self, place: str, name: str) -> None:
        """Have place lead to the pack kept as name (a symlink, made whole or not at all)."""
        link = os.path.join(self.folder, PLACES, place)
        tmp = os.path.join(self.folder, PLACES, f".new-{os.urandom(8).hex()}")
        with contextlib.suppress(OSError):
            os.symlink(os.path.join("..", self.kind, name), tmp)
            try:
                os.replace(tmp, link)
            except OSError:
                os.unlink(tmp)

    def forget(self, place: str | None, name: str | None) -> None:
        """Drop a kept pack that failed a check, and the place that led to it."""
        if place is not None:
            link = os.path.join(self.folder, PLACES, place)
            with contextlib.suppress(OSError):
                name = name or os.path.basename(os.readlink(link))
            with contextlib.suppress(OSError):
                os.unlink(link)
        if name is not None and "/" not in name and not name.startswith("."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.folder, self.kind, name))

    def evict(self) -> int:
        """FolderCache.evict, then drop the places whose pack is gone."""
        left = super().evict()
        with contextlib.suppress(OSError), os.scandir(os.path.join(self.folder, PLACES)) as it:
            for entry in it:
                if not os.path.exists(entry.path):  # follows the link (or a stale .new-)
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        return left


def decoded_packs() -> DecodedPacks | None:
    """This user's kept packs; None when the folder cannot be made (then nothing is kept)."""
    try:
        return DecodedPacks()
    except OSError:
        return None
