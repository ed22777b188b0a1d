"""Reading files of a fresh mount ahead of the program that will need them.

A servicing transaction's mount comes up while its verb still plans (on the other CPU),
and then dpkg runs in it: every file dpkg and the programs it starts read (its database:
`status` and the 150 `info/*.list` files; the programs and their libraries) costs a
LOOKUP, an OPEN and READs through the mount, one round trip each, and the packs holding
them are decompressed on the way.  Read once beforehand, they are in the kernel's caches
(entries, attributes, pages) when dpkg asks: `package add` of hello, its dpkg 108 -> 90 ms.

The paths come from the caller (servicing.reads.DPKG_READS) and are read inside the
mount only: each component is looked up below the one before it without following a
symlink, `*` and `?` match names in a component (fnmatch), and only regular files are
opened for reading (a device node of the image is never opened: the mount has `dev`),
up to a budget; a path ending in "/" is only looked up (the kernel keeps the entry).
Whatever fails is skipped: this only saves time.
"""

from __future__ import annotations

import fnmatch
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence

BUDGET = 32 << 20  # bytes read at most
SECONDS = 2.0  # and for no longer than this
CHUNK = 256 << 10
# Walking opens with O_PATH: a LOOKUP and nothing else (no OPENDIR, no OPEN), and never a
# device node's driver; only a regular file is opened for reading (through /proc).
_WALK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def warm(root: str, patterns: Sequence[str], budget: int = BUDGET,
         seconds: float = SECONDS, stop: Callable[[], bool] = lambda: False) -> int:
    """Read the regular files under root that patterns name ("var/lib/dpkg/status",
    "usr/lib/*/libc.so.6"), until done or stop() says so (asked after each path); the
    bytes read.  A pattern ending in "/" ("dev/") is only looked up."""
    deadline = time.monotonic() + seconds
    left = budget
    listed: dict[tuple[int, int], list[str]] = {}
    try:
        top = os.open(root, _WALK_FLAGS | os.O_DIRECTORY)
    except OSError:
        return 0
    try:
        for pattern in patterns:
            parts = [p for p in pattern.split("/") if p not in ("", ".")]
            if not parts or ".." in parts:
                continue
            for fd in _found(top, parts, pattern.endswith("/"), listed):
                try:
                    left -= _read(fd, left)
                finally:
                    os.close(fd)
                if left <= 0 or time.monotonic() > deadline or stop():
                    return budget - left
            if time.monotonic() > deadline or stop():
                break
    finally:
        os.close(top)
    return budget - left


def _found(parent: int, parts: list[str], lookup_only: bool,
           listed: dict[tuple[int, int], list[str]]) -> Iterator[int]:
    """Descriptors, open for reading, of the regular files below parent (an O_PATH
    descriptor of a directory) that parts name, each the caller's to close; none when
    lookup_only.  listed: directories' names, by (device, inode)."""
    name, rest = parts[0], parts[1:]
    for match in _matches(parent, name, listed):
        try:
            fd = os.open(match, _WALK_FLAGS | (os.O_DIRECTORY if rest or lookup_only else 0),
                         dir_fd=parent)
        except OSError:
            continue  # missing, a symlink, not a directory: not ours to read
        try:
            if rest:
                yield from _found(fd, rest, lookup_only, listed)
            elif not lookup_only and stat.S_ISREG(os.fstat(fd).st_mode):
                yield os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        finally:
            os.close(fd)


def _matches(parent: int, name: str, listed: dict[tuple[int, int], list[str]]
             ) -> list[str]:
    """The names in directory parent that name matches (itself, without wildcards); a
    directory is listed once (ten patterns name the libraries of one)."""
    if not any(c in name for c in "*?["):
        return [name]
    try:
        st = os.fstat(parent)
        names = listed.get((st.st_dev, st.st_ino))
        if names is None:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent)
            try:
                with os.scandir(fd) as it:
                    names = listed[(st.st_dev, st.st_ino)] = sorted(e.name for e in it)
            finally:
                os.close(fd)
    except OSError:
        return []
    return fnmatch.filter(names, name)


def _read(fd: int, limit: int) -> int:
    done = 0
    while done < limit:
        try:
            n = len(os.read(fd, min(CHUNK, limit - done)))
        except OSError:
            break
        if n == 0:
            break
        done += n
    return done
