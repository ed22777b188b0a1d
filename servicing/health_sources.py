"""Where health restore finds the right content of a damaged package file.

- IndexSource (--source IMAGE:INDEX): the file at the same path in an index (of this
  image or another), read without mounting, used only when its md5 is the one the damaged
  image's own md5sums record.  It keeps the source's owner, mode, mtime and xattrs.
- DebSource (--debs DIR): the member of the .deb of exactly the installed package's name,
  version and architecture (read from each .deb's control), its md5 checked the same way.
  Owner and group come from the tar's names looked up in the image (dpkg does the same),
  with the image's dpkg-statoverride entries applied (Owners).

Both are anybody's files: a .deb that cannot be read is a note and is not used; a file
that differs is not used; reads are bounded by the files' own sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from debian.arfile import ArError
from debian.debfile import DebError, DebFile

from imagefs.errors import Error, UsageError
from imagefs.format import layout as F
from imagefs.format.records import Inode
from imagefs.format.view import IndexView
from imagefs.image import Image

from .health_scan import ADMINDIR, Database, require_debian
from .roots import IndexRoot, Root

READ_STEP = 1 << 20
# What reading a hostile or truncated .deb raises.
BAD_DEB = (DebError, ArError, tarfile.TarError, EOFError, OSError, ValueError, KeyError,
           lzma.LZMAError, zlib.error)


@dataclass
class Found:
    """The right content of a file, in a source: where, and its owner, mode and mtime."""

    source: str  # "IMAGE:INDEX", or the .deb's path
    member: str  # the path in the source index, or the tar member's name
    uid: int
    gid: int
    uname: str  # the tar's names ("" for a source index)
    gname: str
    mode: int
    mtime_ns: int
    size: int
    xattrs: list[list[str]] | None  # [name, value hex]; None: keep the image file's own
    by_name: bool  # a .deb's member: owner by names, dpkg-statoverride applies


class IndexSource:
    """--source IMAGE:INDEX, split at the last colon (an image path may hold colons).

    The image is opened once, here, and kept open until close(): every file the plan looks
    up and every file apply reads comes from the index as it was checked here (readers of
    an image take no lock, and what a commit refers to is never rewritten)."""

    def __init__(self, spec: str) -> None:
        image, sep, index = spec.rpartition(":")
        if not sep or not image or not index:
            raise UsageError(f"--source {spec!r}: give IMAGE:INDEX (an image file and an "
                             "index of it, a number or a name)")
        self.spec, self.image = spec, os.path.abspath(image)
        self._img: Image | None = Image.open(self.image)
        try:
            view = self._img.view(index)
            self.number, self.name = view.number, view.entry.name
            require_debian(IndexRoot(view), f"--source {spec}: ")
        except BaseException:
            self.close()
            raise
        self._view: IndexView | None = view
        self.label = f"{self.image}:{self.number}"

    def close(self) -> None:
        """Close the source image (again: nothing)."""
        img, self._img, self._view = self._img, None, None
        if img is not None:
            img.close()

    def __enter__(self) -> IndexSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _opened(self) -> IndexView:
        if self._view is None:
            raise ValueError(f"the source {self.label} is closed")
        return self._view

    def find(self, db: Database, path: str, pkg: str, md5: str) -> Found | str:
        """path's content in the source if its md5 is md5, else why not."""
        view = self._opened()
        try:
            try:
                ino = view.lookup(path)
            except Error:
                return f"not in the source {self.label}"
            if ino.kind != F.REG:
                return f"not a regular file in the source {self.label}"
            digest = hashlib.md5(usedforsecurity=False)
            for data in _read(view, ino):
                digest.update(data)
        except Error as e:
            return f"the source {self.label} cannot be read: {e}"
        if digest.hexdigest() != md5:
            return f"the source's copy differs from {pkg}'s md5sums (another version?)"
        xattrs = [[n.decode("utf-8", "surrogateescape"), v.hex()] for n, v in ino.xattrs]
        return Found(self.label, path, ino.uid, ino.gid, "", "", ino.mode, ino.mtime_ns,
                     ino.size, xattrs, by_name=False)

    def content(self, member: str) -> Iterator[bytes]:
        view = self._opened()
        yield from _read(view, view.lookup(member))


def _read(view: IndexView, ino: Inode) -> Iterator[bytes]:
    """A file's bytes (holes as zeros), a step at a time."""
    pos = 0
    while pos < ino.size:
        data = view.read(ino, pos, min(READ_STEP, ino.size - pos))
        if not data:
            break
        pos += len(data)
        yield bytes(data)


class DebSource:
    """--debs DIR: the .deb files in DIR (not its subfolders), by package, version and
    architecture.

    Each .deb's data is read once, the first time a file is looked up in it: every member
    listed with the md5 of its content, and the members of the files the plan is about
    (want) kept in a temporary file until apply writes them.  Memory holds the listings,
    not the contents (but for a data.tar.zst, which python-debian decompresses whole in
    memory for each read); close() drops the kept contents."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        if not os.path.isdir(self.directory):
            raise UsageError(f"--debs {directory}: not a directory")
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".deb"))
        if not names:
            raise UsageError(f"--debs {directory}: no .deb files there")
        self.debs: dict[tuple[str, str, str], list[str]] = {}
        self.notes: list[str] = []
        for name in names:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                continue
            try:
                with contextlib.closing(DebFile(path)) as deb:
                    control = deb.debcontrol()
                    key = (control["Package"], control["Version"], control["Architecture"])
            except BAD_DEB as e:
                self.notes.append(f"{name}: not a readable package ({_why(e)}); not used")
                continue
            self.debs.setdefault(key, []).append(path)
        self._listings: dict[str, _Listing] = {}  # .deb -> its members, read once
        self._wanted: dict[str, set[str]] = {}  # member (normalised) -> md5s to keep
        self._given: dict[str, set[str]] = {}  # .deb -> members find() handed out
        self._kept = _Kept()

    def close(self) -> None:
        """Drop the kept contents (again: nothing)."""
        self._kept.close()
        self._listings.clear()

    def __enter__(self) -> DebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def want(self, db: Database, files: list[tuple[str, str]]) -> None:
        """The files (path in the image, md5 its package records) that find() is about to
        be asked for: their members are kept while each .deb is read, for content()."""
        for path, md5 in files:
            self._wanted.setdefault(_norm(db.package_path(path)), set()).add(md5)

    def find(self, db: Database, path: str, pkg: str, md5: str) -> Found | str:
        """path's content in the installed version's .deb if its md5 is md5, else why
        not."""
        package = db.package(pkg)
        if package is None:
            return f"{pkg} is not installed in the image's dpkg database"
        want = (package.name, package.version, package.architecture)
        candidates = self.debs.get(want, [])
        if not candidates:
            return f"no .deb of {want[0]} {want[1]} ({want[2]}) in {self.directory}"
        reasons = []
        for deb in candidates:
            got = self._look(deb, db.package_path(path), md5)
            if isinstance(got, Found):
                return got
            reasons.append(f"{os.path.basename(deb)}: {got}")
        return "; ".join(reasons)

    def _look(self, deb: str, path: str, md5: str) -> Found | str:
        listing = self._listing(deb)
        if listing.error is not None:
            return f"not a readable package ({listing.error}); not used"
        name = listing.regular(path)
        if name is None:
            return f"has no {path}"
        if name in listing.bad:
            return f"not a readable package ({_why(listing.bad[name])}); not used"
        if listing.md5[name] != md5:
            return f"its {path} differs from the image's md5sums; not used"
        info = listing.members[name]
        self._given.setdefault(deb, set()).add(name)
        return Found(deb, str(info.name), info.uid, info.gid, info.uname, info.gname,
                     info.mode, int(info.mtime) * 1_000_000_000, info.size, None,
                     by_name=True)

    def _listing(self, deb: str) -> _Listing:
        if deb not in self._listings:
            self._listings[deb] = self._read_deb(deb, self._wanted)
        return self._listings[deb]

    def content(self, deb: str, member: str) -> Iterator[bytes]:
        """A member find() handed out, as kept when its .deb was read (else read again,
        with every other member handed out and not kept: a hard link's target, say)."""
        name = _norm(member)
        if not self._kept.has(deb, name):
            given = self._given.get(deb, set()) | {name}
            again = self._read_deb(deb, {n: set() for n in given
                                         if not self._kept.has(deb, n)}, strict=True)
            if name in again.bad:
                raise again.bad[name]
        if self._kept.has(deb, name):
            yield from self._kept.read(deb, name)
            return
        with _data(deb) as tar:  # gone, or no room to keep it: straight from the .deb
            info = _member(tar, name)
            if info is None:
                raise UsageError(f"{deb}: {member} went away")
            yield from _extract(tar, info)

    def _read_deb(self, deb: str, keep: dict[str, set[str]], strict: bool = False
                  ) -> _Listing:
        """One pass over deb's data: its members, each regular one's md5, and the members
        named in keep kept (when their md5 is one of keep's, or keep gives none).  A .deb
        whose data cannot be read is noted in the listing (strict: raises)."""
        listing = _Listing()
        try:
            with _data(deb) as tar:
                for info in tar:
                    name = _norm(info.name)
                    listing.add(name, info)
                    md5s = keep.get(name)
                    if md5s is not None:
                        self._kept.drop(deb, name)  # a later member of the same name wins
                    if info.isreg():
                        self._take(deb, name, _extract(tar, info), listing, md5s)
        except BAD_DEB as e:
            if strict:
                raise
            listing.error = _why(e)
        return listing

    def _take(self, deb: str, name: str, content: Iterator[bytes], listing: _Listing,
              md5s: set[str] | None) -> None:
        """Read a regular member through: its md5 into listing, its content kept when
        wanted.  A member shorter than its size is noted as such; the data not reading
        (not decompressing, cut short) stops the pass: the whole .deb is unreadable."""
        digest = hashlib.md5(usedforsecurity=False)
        keeping = self._kept.start() if md5s is not None else None
        try:
            for data in content:
                digest.update(data)
                if keeping is not None:
                    self._kept.write(data)
        except _BadMember as e:
            listing.bad[name] = e
            self._kept.abandon(keeping)
            return
        except BaseException:
            self._kept.abandon(keeping)
            raise
        listing.md5[name] = digest.hexdigest()
        if md5s is not None and (not md5s or listing.md5[name] in md5s):
            self._kept.finish(keeping, deb, name)
        else:
            self._kept.abandon(keeping)


class _Listing:
    """A .deb's data members by their normalised names (the last of a name wins), with each
    regular member's md5 or what reading it raised."""

    def __init__(self) -> None:
        self.members: dict[str, tarfile.TarInfo] = {}
        self.md5: dict[str, str] = {}
        self.bad: dict[str, BaseException] = {}  # what reading the member raised
        self.error: str | None = None  # the data cannot be read (listed) at all

    def add(self, name: str, info: tarfile.TarInfo) -> None:
        self.members[name] = info
        self.md5.pop(name, None)
        self.bad.pop(name, None)

    def regular(self, path: str) -> str | None:
        """The name of the regular member at path (a hard link resolved to its target),
        or None."""
        name = _norm(path)
        info = self.members.get(name)
        if info is not None and info.islnk():
            name = _norm(info.linkname)
            info = self.members.get(name)
        return name if info is not None and info.isreg() else None


class _Kept:
    """Members' contents kept between the plan that checked them and the apply that writes
    them, one after the other in one unnamed temporary file (created on first use): their
    size costs disk, not memory.  A kept content that cannot be written is not kept (it is
    read again from its .deb when needed)."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._where: dict[tuple[str, str], tuple[int, int]] = {}  # -> (offset, size)
        self._end = 0
        self._failed = False  # the member being kept could not be written whole

    def has(self, deb: str, name: str) -> bool:
        return (deb, name) in self._where

    def drop(self, deb: str, name: str) -> None:
        self._where.pop((deb, name), None)

    def start(self) -> int:
        self._failed = False
        return self._end

    def write(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            if self._file is None:
                # Lives until close(), as long as the source.
                self._file = tempfile.TemporaryFile()  # noqa: SIM115
            view = memoryview(data)
            while view:
                done = os.pwrite(self._file.fileno(), view, self._end)
                self._end += done
                view = view[done:]
        except OSError:
            self._failed = True

    def finish(self, start: int | None, deb: str, name: str) -> None:
        if start is None or self._failed:
            self.abandon(start)
        else:
            self._where[(deb, name)] = (start, self._end - start)

    def abandon(self, start: int | None) -> None:
        """Forget what was written since start (the file's end goes back there)."""
        if start is not None:
            self._end = start
            if self._file is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._file.fileno(), start)

    def read(self, deb: str, name: str) -> Iterator[bytes]:
        assert self._file is not None
        pos, left = self._where[(deb, name)]
        while left > 0:
            data = os.pread(self._file.fileno(), min(READ_STEP, left), pos)
            if not data:
                raise EOFError(f"{name}: the kept copy ends early")
            pos += len(data)
            left -= len(data)
            yield data

    def close(self) -> None:
        file, self._file = self._file, None
        self._where.clear()
        self._end = 0
        if file is not None:
            file.close()


@contextlib.contextmanager
def _data(deb: str) -> Iterator[tarfile.TarFile]:
    with contextlib.closing(DebFile(deb)) as pkg:
        yield pkg.data.tgz()


def _norm(name: str) -> str:
    """A tar member's name as a path relative to the root: "./usr/bin/x" -> "usr/bin/x"."""
    return posixpath.normpath("/" + name).lstrip("/")


def _member(tar: tarfile.TarFile, path: str) -> tarfile.TarInfo | None:
    """The regular file member at path (a hard link resolved to its target), or None."""
    listing = _Listing()
    for info in tar.getmembers():
        listing.add(_norm(info.name), info)
    name = listing.regular(path)
    return None if name is None else listing.members[name]


class _BadMember(tarfile.TarError):
    """A member that cannot be read while the data around it can: the member's own fault
    (the rest of the .deb stays usable)."""


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Iterator[bytes]:
    fh = tar.extractfile(info)
    if fh is None:
        raise _BadMember(f"{info.name} is not a file")
    left = info.size
    while left > 0:
        data = fh.read(min(READ_STEP, left))
        if not data:
            raise _BadMember(f"{info.name} ends early")
        left -= len(data)
        yield data


def _why(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Owners:
    """Owner, group and mode as dpkg gives a .deb's member in this image: the tar's user and
    group names looked up in the image's passwd and group (else its numbers), and the
    image's dpkg-statoverride entries win.  A source index's file keeps its own."""

    def __init__(self, root: Root) -> None:
        self.users = _ids(root.read("/etc/passwd"))
        self.groups = _ids(root.read("/etc/group"))
        self.overrides: dict[str, tuple[str, str, int]] = {}
        text = (root.read(f"{ADMINDIR}/statoverride") or b"").decode("utf-8", "replace")
        for line in text.splitlines():
            words = line.split(None, 3)
            if len(words) == 4:
                with contextlib.suppress(ValueError):
                    self.overrides[words[3]] = (words[0], words[1], int(words[2], 8))

    def resolve(self, found: Found, path: str) -> tuple[int, int, int]:
        """(uid, gid, permission bits) for found, a file at path in the image."""
        if not found.by_name:
            return found.uid, found.gid, found.mode & 0o7777
        uid = self.users.get(found.uname, found.uid)
        gid = self.groups.get(found.gname, found.gid)
        mode = found.mode
        if path in self.overrides:
            user, group, mode = self.overrides[path]
            uid = _named(self.users, user, uid)
            gid = _named(self.groups, group, gid)
        return uid, gid, mode & 0o7777


def _named(table: dict[str, int], name: str, default: int) -> int:
    """dpkg-statoverride's owner: a name, or #NUMBER."""
    if name.startswith("#") and name[1:].isdigit():
        return int(name[1:])
    return table.get(name, default)


def _ids(text: bytes | None) -> dict[str, int]:
    """name -> id of an /etc/passwd or /etc/group."""
    out: dict[str, int] = {}
    for line in (text or b"").decode("utf-8", "replace").splitlines():
        words = line.split(":")
        if len(words) >= 3 and words[2].isdigit():
            out.setdefault(words[0], int(words[2]))
    return out
