"""Optimize: an image file rewritten in place holding only what its indices reference
(wimoptimize), after deletes and many commits have left content no index uses.

The new file is built beside the old one as an unnamed file (O_TMPFILE) by export's
machinery (packs used whole move as stored, partly used ones are repacked, a level asked
recompresses all), then takes the old one's name with one rename(2): until then the old
file is whole and current, afterwards the new one is; killed at any moment, the name
names one of the two, whole.  The writer lock is held on the old file throughout, and a
writer that waited for it finds that the name now names another file and refuses
(ImageFile.lock), so no commit goes into the replaced file.  Sessions (writable mounts,
live or waiting for their commit) are written against the old file's layout: optimize
refuses while the image has any.  Read-only mounts go on reading the old file, which lives
as long as they hold it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagefs.errors import DestinationError, SessionsOpen
from imagefs.export import export_all_into, link_unnamed, new_unnamed
from imagefs.format.container import crash_point
from imagefs.format.files import fsync_dir
from imagefs.image import Image, check_level, profile_pack_target
from imagefs.mount.kernel import FSTYPE, kernel_mounts, pid_alive
from imagefs.session.lifecycle import list_sessions

TEMP_PREFIX = ".imagefs-optimize-"  # the new file's name in the directory, for one rename


@dataclass
class Optimized:
    image: str
    indices: int
    size_before: int
    size_after: int

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "indices": self.indices,
                "size_before": self.size_before, "size_after": self.size_after,
                "reclaimed": self.size_before - self.size_after}


def optimize(path: str, level: int | None = None,
             progress: Callable[[int], None] | None = None,
             on_total: Callable[[int], None] | None = None,
             who: dict[str, Any] | None = None, wait: float | None = None,
             compact: bool = False, check: bool = False) -> Optimized:
    """Rewrite the image at path with only what its indices reference.  level: recompress
    every chunk at it (None: move whole packs as stored).  compact: the compact profile's
    packs, every chunk recompressed.  wait: for another writer, as export's.  check: also
    decompress every copied pack and check its chunks."""
    if level is not None:
        check_level(level)
    path = os.path.realpath(path)  # a symlink's target is rewritten, the symlink kept
    with Image.open(path) as image:
        image.file.lock(wait=wait)  # held until the new file has the name
        image.commit = image.file.read_commit()  # as it is now that no one else writes
        before = os.fstat(image.file.fd)
        _refuse_sessions(path, image.file.header.uuid.hex(), before)
        numbers = list(range(1, len(image.indices) + 1))
        if on_total:
            on_total(sum(e.bytes for e in image.indices))
        if before.st_nlink > 1:
            raise DestinationError(path, f"has {before.st_nlink} hard links: the new file "
                                         "would take this name only, and the others would "
                                         "go on naming the old one; remove them first")
        out = new_unnamed(path, profile_pack_target(compact))
        try:
            _keep_owner(out.fd, path, before)
            export_all_into(image, numbers, out, level, progress, who, action="optimize",
                            compact=compact, check=check)
            _replace(out.fd, path)
            after = os.fstat(out.fd).st_size
        finally:
            out.close()
    return Optimized(path, len(numbers), before.st_size, after)


def _refuse_sessions(path: str, uuid: str, mine: os.stat_result) -> None:
    """SessionsOpen if a session of the image is known here (live or waiting for its
    commit), or if the kernel has a writable imagefs mount of the file (a session kept in
    another state directory: another user's, the daemon's)."""
    try:
        sessions = [s for s in list_sessions() if s.uuid == uuid]
    except OSError:  # a state directory this user may not read: the kernel's table says
        sessions = []
    found = [s.id for s in sessions]
    for m in kernel_mounts():
        if m.fstype != FSTYPE or not m.writable or m.mountpoint in {
                s.mountpoint for s in sessions}:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(m.source)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                found.append(m.mountpoint)
    if found:
        raise SessionsOpen(path, len(found), ", ".join(found))


def _keep_owner(fd: int, path: str, old: os.stat_result) -> None:
    """The new file gets the old one's owner and mode, or optimize refuses: replacing
    an image must not hand it to whoever optimized it."""
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        raise DestinationError(path, f"its owner (uid {old.st_uid}, gid {old.st_gid}) "
                                     "cannot be kept by this user; optimize it as its "
                                     "owner or as root") from None
    os.fchmod(fd, old.st_mode & 0o7777)


def _replace(fd: int, path: str) -> None:
    """Give the unnamed file fd the name path, replacing the file there, in one rename(2):
    it is linked under a temporary name in the same directory first (a leftover of a kill
    between the two steps is removed by the next optimize of that directory)."""
    directory, name = os.path.split(path)
    _remove_leftovers(directory)
    temp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{name}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    link_unnamed(fd, temp)
    crash_point("optimize-linked")
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    crash_point("optimize-replaced")
    fsync_dir(directory)


def _remove_leftovers(directory: str) -> None:
    """Temporary names left by an optimize killed between its link and its rename, whose
    process is gone (the image itself was never touched: it is still the old file)."""
    for entry in os.scandir(directory):
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        pid = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
