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
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

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
    """--source IMAGE:INDEX, split at the last colon (an image path may hold colons)."""

    def __init__(self, spec: str) -> None:
        image, sep, index = spec.rpartition(":")
        if not sep or not image or not index:
            raise UsageError(f"--source {spec!r}: give IMAGE:INDEX (an image file and an "
                             "index of it, a number or a name)")
        self.spec, self.image = spec, os.path.abspath(image)
        with Image.open(self.image) as img:
            view = img.view(index)
            self.number, self.name = view.number, view.entry.name
            require_debian(IndexRoot(view), f"--source {spec}: ")
        self.label = f"{self.image}:{self.number}"

    def find(self, db: Database, path: str, pkg: str, md5: str) -> Found | str:
        """path's content in the source if its md5 is md5, else why not."""
        try:
            with Image.open(self.image) as img:
                view = img.view(self.number)
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
        with Image.open(self.image) as img:
            view = img.view(self.number)
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
    architecture."""

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
        try:
            with _data(deb) as tar:
                info = _member(tar, path)
                if info is None:
                    return f"has no {path}"
                digest = hashlib.md5(usedforsecurity=False)
                for data in _extract(tar, info):
                    digest.update(data)
        except BAD_DEB as e:
            return f"not a readable package ({_why(e)}); not used"
        if digest.hexdigest() != md5:
            return f"its {path} differs from the image's md5sums; not used"
        return Found(deb, info.name, info.uid, info.gid, info.uname, info.gname, info.mode,
                     int(info.mtime) * 1_000_000_000, info.size, None, by_name=True)

    def content(self, deb: str, member: str) -> Iterator[bytes]:
        with _data(deb) as tar:
            info = _member(tar, "/" + _norm(member))
            if info is None:
                raise UsageError(f"{deb}: {member} went away")
            yield from _extract(tar, info)


@contextlib.contextmanager
def _data(deb: str) -> Iterator[tarfile.TarFile]:
    with contextlib.closing(DebFile(deb)) as pkg:
        yield pkg.data.tgz()


def _norm(name: str) -> str:
    """A tar member's name as a path relative to the root: "./usr/bin/x" -> "usr/bin/x"."""
    return posixpath.normpath("/" + name).lstrip("/")


def _member(tar: tarfile.TarFile, path: str) -> tarfile.TarInfo | None:
    """The regular file member at path (a hard link resolved to its target), or None."""
    want = _norm(path)
    members = {_norm(m.name): m for m in tar.getmembers()}
    info = members.get(want)
    if info is not None and info.islnk():
        info = members.get(_norm(info.linkname))
    return info if info is not None and info.isreg() else None


def _extract(tar: tarfile.TarFile, info: tarfile.TarInfo) -> Iterator[bytes]:
    fh = tar.extractfile(info)
    if fh is None:
        raise tarfile.TarError(f"{info.name} is not a file")
    left = info.size
    while left > 0:
        data = fh.read(min(READ_STEP, left))
        if not data:
            raise EOFError(f"{info.name} ends early")
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
