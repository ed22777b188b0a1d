"""Directory handles of a writable mount: opendir, readdir, releasedir, fsyncdir.

A directory handle keeps the names of its directory as they were when it was read from the
start (opendir, rewinddir), in name order; a readdir offset is a position in that list, so
it stays valid whatever happens to the directory meanwhile.  Each name is looked up again
when it is handed out: one removed since is skipped, one replaced is given with its present
inode, and names created since are not listed (POSIX leaves both open).  An inode number
kept from the first read could be gone (removed and forgotten) by then.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pyfuse3

from imagefs.format import layout as F
from imagefs.mount.fuse import BaseOperations, boundary
from imagefs.mount.tree import Refusal

from .tree import SessionTree

# struct fuse_direntplus up to its name: fuse_entry_out (128 bytes) and fuse_dirent's fixed
# part (24); each entry of a READDIRPLUS reply is that, the name, padded to 8 bytes.
DIRENTPLUS_HEADER = 152


def _direntplus_size(name: bytes) -> int:
    return (DIRENTPLUS_HEADER + len(name) + 7) & ~7


class DirHandle:
    """An open directory: its inode and, once read from the start, its names then."""

    __slots__ = ("ino", "names")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.names: list[bytes] | None = None


class DirectoryHandles(BaseOperations):
    """The directory-handle requests of WritableOperations (fuse.py), which inherits them."""

    tree: SessionTree

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self._dirs: dict[int, DirHandle] = {}
        self._next_dir_handle = 1

    @boundary
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        return self.open_dir(inode)

    def open_dir(self, inode: int) -> int:
        """A new handle of directory inode (also the fast path's opendir)."""
        if self.tree.attrs(inode).kind != F.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[fh] = DirHandle(inode)
        return fh

    def dir_fast_functions(self) -> dict[str, Any]:
        """opendir, READDIRPLUS and releasedir for the fast paths: they never wait."""
        return {"opendir": lambda ino: (self.open_dir(ino),),
                "readdir": self.entries_that_fit,
                "releasedir": self.release_dir}

    def entries_that_fit(self, fh: int, start_id: int, size: int
                         ) -> list[tuple[bytes, tuple[Any, ...], int]] | int:
        """The fast path's READDIRPLUS: (name, attributes, next offset) of the entries
        from start_id that fit in a reply of size bytes, each counted as a lookup.  Only
        what fits is answered (the C side packs it all): an entry counted but not sent
        would keep its inode alive for good."""
        handle = self._dirs.get(fh)
        if handle is None:
            return -errno.EBADF
        out: list[tuple[bytes, tuple[Any, ...], int]] = []
        room = [size]  # bytes of the reply still free, as the entries are taken
        for nxt, name, ino, attrs in self._entries(
                handle, start_id, self.attr_tuple,
                lambda name: _direntplus_size(name) <= room[0]):
            out.append((name, attrs, nxt))
            room[0] -= _direntplus_size(name)
            self.tree.remember(ino, handle.ino)
        return out

    def _entries(self, handle: DirHandle, start_id: int, attrs_of: Callable[[int, Any], Any],
                 fits: Callable[[bytes], bool] = lambda _name: True
                 ) -> Iterator[tuple[int, bytes, int, Any]]:
        """(next offset, name, inode, attrs_of(inode, node)) of the handle's entries from
        start_id, each looked up again now: one removed since is skipped; stops before the
        first that does not fit.  An entry that fails ends the listing once entries were
        taken (they stand, and count; the next readdir, starting at this one, reports it),
        else is the error of this readdir."""
        tree = self.tree
        if start_id == 0 or handle.names is None:  # from the start: the names as they are
            handle.names = [name for name, _ino in tree.listing(handle.ino)]
        names = handle.names
        given = False
        for i in range(start_id, len(names)):
            name = names[i]
            if not fits(name):
                return
            ino: int | None = None
            try:
                ino = tree.lookup(handle.ino, name)
                if ino is None:
                    continue  # removed since
                attrs = attrs_of(ino, tree.attrs(ino))
            except Refusal:
                continue  # gone since
            except Exception as e:
                if given:
                    return
                if ino is not None:
                    raise pyfuse3.FUSEError(self.errno_for(e, "readdir", (ino, name))
                                            ) from None
                raise
            yield i + 1, name, ino, attrs
            given = True

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # Not under @boundary: its first argument is a handle, and what goes wrong is
        # logged under the inode of the directory (or of the entry) instead.
        handle = self._dirs.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            self._readdir(handle, start_id, token)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(self.errno_for(e, "readdir", (handle.ino, start_id))
                                    ) from None

    def _readdir(self, handle: DirHandle, start_id: int, token: Any) -> None:
        for nxt, name, ino, attrs in self._entries(handle, start_id, self.attributes):
            if not pyfuse3.readdir_reply(token, name, attrs, nxt):
                break
            self.tree.remember(ino, handle.ino)  # every entry handed out counts as a lookup

    async def releasedir(self, fh: int) -> None:
        self.release_dir(fh)

    def release_dir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.tree.fsync()
