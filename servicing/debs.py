"""Debian .deb files given to `imagefs package add`, opened and checked before anything
changes.

A .deb is anybody's file, and the image's dpkg unpacks it as root.  So every file is read
with python-debian (debian.debfile: the ar archive, control.tar, data.tar) and refused,
with one line naming the file, when it is not a package (not an ar archive, truncated,
missing parts or control fields) or when its data could land outside the root: a member
name that is absolute or has a `..` component, a symlink whose relative target climbs out
of the root from the member's directory, a hard link to a name that is not an earlier
member, or a device node (Debian packages ship none).  Each file listed in md5sums must be
in the data, with that md5.  The file's sha256 is kept: what is copied into the container
is checked against it, so a file changed after the check is never installed.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from debian.arfile import ArError
from debian.debfile import DebError, DebFile

from imagefs.errors import NotFound, one_line

from .transaction import Refused

NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+\Z")  # Debian policy 5.6.1
VERSION = re.compile(r"([0-9]+:)?[0-9][A-Za-z0-9.+~:-]*\Z")  # dpkg's; checked further below
ARCH = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
REQUIRED = ("Package", "Version", "Architecture")
CHUNK = 1 << 20
KEEP = 32 << 20  # bytes of file content the check keeps for compressing ahead, at most
MAX_CONTROL = 4 << 20  # bytes of control.tar members read at most
# What reading a damaged archive raises: python-debian's own errors, and those of the
# decompressors and tarfile below it.
BROKEN = (ArError, DebError, tarfile.TarError, EOFError, lzma.LZMAError, zlib.error,
          OSError, ValueError, KeyError, UnicodeDecodeError)


@dataclass(frozen=True)
class Deb:
    """One checked .deb: where it is, what it is (its control fields), its sha256."""

    path: str  # absolute
    given: str  # as the user named it, for messages
    sha256: str
    size: int  # bytes of the .deb
    fields: dict[str, str] = field(compare=False)
    md5sums: int = 0  # files listed in md5sums
    # The content of each regular file in the data, in the archive's order, as the check
    # read it (None: more than KEEP bytes, read again when asked: file_contents)
    contents: tuple[bytes, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.fields["Package"]

    @property
    def version(self) -> str:
        return self.fields["Version"]

    @property
    def architecture(self) -> str:
        return self.fields["Architecture"]


def refuse(given: str, why: str) -> Refused:
    return Refused(f"{one_line(given)}: {why}")


def open_deb(path: str, check_data: bool = True) -> Deb:
    """Open and check the .deb at path (see the module's docstring); Refused (one line) when
    it is not a package or not safe to unpack, NotFound when there is no such file.
    check_data=False reads the control part only (indexing a repository: the data of
    a chosen package is checked before it is used)."""
    given, path = path, os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{one_line(given)}: no such file") from None
    except OSError as e:
        raise refuse(given, f"cannot read it: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse(given, "not a file (a .deb package was expected)")
    try:
        with open(path, "rb") as fh:
            deb = DebFile(fileobj=fh)
            _check_ar(given, deb, st.st_size)
            fields = _control(given, deb)
            sums = _md5sums(given, deb)
            contents = _check_data(given, deb, sums) if check_data else None
            deb.close()
            fh.seek(0)
            digest = _sha256(fh)  # of the file checked, not of one put in its place
    except BROKEN as e:
        raise refuse(given, f"not a Debian package, or a damaged one ({_why(e)})") from None
    return Deb(path, given, digest, st.st_size, fields, len(sums), contents)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return one_line(text[0][:120]) if text else type(e).__name__


def _check_ar(given: str, deb: DebFile, size: int) -> None:
    """The ar archive's members fit in the file (a truncated data.tar is found here even
    when only the control part is read) and it is a format 2.0 package."""
    end = 8  # "!<arch>\n"
    members = deb.getmembers()
    for i, member in enumerate(members):
        end += 60 + member.size + (member.size % 2 if i < len(members) - 1 else 0)
    if end > size:
        raise refuse(given, f"truncated: its parts need {end} bytes, the file has {size}")
    if deb.version.decode("ascii", "replace").strip() != "2.0":
        raise refuse(given, "not a Debian package of format 2.0 (debian-binary)")


def _control(given: str, deb: DebFile) -> dict[str, str]:
    """The control fields, checked: required ones present and well formed."""
    for member in deb.control.tgz().getmembers():
        name = member.name[2:] if member.name.startswith("./") else member.name
        if name not in (".", "") and ("/" in name or name == ".."):
            raise refuse(given, f"control part holds an unexpected name {one_line(name)!r}")
        if member.size > MAX_CONTROL:
            raise refuse(given, f"control part holds a {member.size}-byte {one_line(name)}")
    raw = deb.control.get_content("control")
    if raw is None:
        raise refuse(given, "not a Debian package (no control file)")
    from debian.deb822 import Deb822

    fields = {k: v.strip() for k, v in Deb822(raw.decode("utf-8", "replace")).items()}
    missing = [f for f in REQUIRED if not fields.get(f)]
    if missing:
        raise refuse(given, f"its control file lacks {', '.join(missing)}")
    if not NAME.match(fields["Package"]):
        raise refuse(given, f"bad package name {one_line(fields['Package'])!r}")
    if not valid_version(fields["Version"]):
        raise refuse(given, f"bad version {one_line(fields['Version'])!r}")
    if not ARCH.match(fields["Architecture"]):
        raise refuse(given, f"bad architecture {one_line(fields['Architecture'])!r}")
    size = fields.get("Installed-Size", "0")
    if not size.isdigit():
        raise refuse(given, f"bad Installed-Size {one_line(size)!r}")
    return fields


def valid_version(text: str) -> bool:
    """A version dpkg accepts: [epoch:]upstream[-revision], upstream starting with a
    digit, no empty revision."""
    from debian.debian_support import Version

    if not VERSION.match(text) or text.endswith("-"):
        return False
    try:
        Version(text)
    except ValueError:
        return False
    return True


def _md5sums(given: str, deb: DebFile) -> dict[str, str]:
    if not deb.control.has_file("md5sums"):
        return {}
    sums = {}
    for key, value in deb.md5sums().items():
        if not re.fullmatch(r"[0-9a-f]{32}", value):
            raise refuse(given, "its md5sums file is malformed")
        sums[os.fsdecode(key).removeprefix("./")] = value
    return sums


def _check_data(given: str, deb: DebFile, sums: dict[str, str]) -> tuple[bytes, ...] | None:
    """Every data member stays inside the root; every file in md5sums is there, intact.
    The content of each regular file, as read for that (what compressing ahead takes: the
    data is not decompressed twice), or None past KEEP bytes."""
    seen: set[str] = set()
    left = dict(sums)
    kept: list[bytes] | None = []
    total = 0
    tar = deb.data.tgz()
    for member in tar:
        problem = member_problem(member.name, member, seen)
        if problem:
            raise refuse(given, f"unsafe package: its data holds {problem}")
        path = _relative(member.name)
        seen.add(path)
        if member.isfile() and (path in left or (kept is not None and member.size)):
            total += member.size
            if total > KEEP:
                kept = None
            digest = hashlib.md5(usedforsecurity=False)
            fh = tar.extractfile(member)
            assert fh is not None
            blocks = []
            while block := fh.read(CHUNK):
                digest.update(block)
                if kept is not None:
                    blocks.append(block)
            if kept is not None and member.size:
                kept.append(b"".join(blocks))
            if path in left and digest.hexdigest() != left.pop(path):
                raise refuse(given, f"{one_line(path)} does not match its md5sum "
                                    "(a damaged package)")
        elif member.islnk() and path in left:
            left.pop(path)
    if left:
        first = one_line(sorted(left)[0])
        raise refuse(given, f"its md5sums list {first}, which its data does not hold "
                            "(a damaged package)")
    return None if kept is None else tuple(kept)


def file_contents(deb: Deb, most: int) -> Iterator[bytes]:
    """The content of each regular file in deb's data, in the archive's order, while
    their sum stays within most bytes: what dpkg will write, for compressing ahead
    (imagefs.format.ahead).  A guess: a package that cannot be read gives nothing more.
    What the check kept is not read again."""
    if deb.contents is not None:
        for kept in deb.contents:
            most -= len(kept)
            if most < 0:
                return
            yield kept
        return
    try:
        with open(deb.path, "rb") as fh:
            tar = DebFile(fileobj=fh).data.tgz()
            for member in tar:
                if not member.isfile() or member.size == 0:
                    continue
                most -= member.size
                if most < 0:
                    return
                data = tar.extractfile(member)
                if data is not None:
                    yield data.read(member.size)
    except BROKEN:
        return


def _relative(name: str) -> str:
    """A member name as a path relative to the root: './usr/bin/x' -> 'usr/bin/x'."""
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if name not in (".", "./") else ""


def member_problem(name: str, member: tarfile.TarInfo, seen: Iterable[str]) -> str | None:
    """What makes a data member unsafe to unpack, or None."""
    shown = one_line(name)
    if name.startswith("/"):
        return f"an absolute path ({shown})"
    parts = _relative(name).split("/")
    if ".." in parts:
        return f"a path with a '..' component ({shown})"
    if member.ischr() or member.isblk():
        return f"a device node ({shown})"
    target = member.linkname
    if member.issym() and not target.startswith("/"):
        where = parts[:-1]  # a relative target starts at the member's directory
        for part in target.split("/"):
            if part == "..":
                if not where:
                    return f"a symlink pointing outside the root ({shown} -> {one_line(target)})"
                where.pop()
            elif part not in ("", "."):
                where.append(part)
    if member.islnk():
        if target.startswith("/") or ".." in target.split("/"):
            return f"a hard link pointing outside the root ({shown} -> {one_line(target)})"
        if _relative(target) not in set(seen):
            return f"a hard link to a file not before it ({shown} -> {one_line(target)})"
    return None


def repository(folder: str) -> tuple[list[Deb], list[str]]:
    """The .debs under folder (its subfolders too), control parts only, and a note for each
    file that could not be read as a package (it is left out)."""
    if not os.path.isdir(folder):
        if not os.path.exists(folder):
            raise NotFound(f"{one_line(folder)}: no such folder (--repository)")
        raise Refused(f"{one_line(folder)}: not a folder (--repository wants a folder of "
                      ".debs)")
    found, skipped = [], []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".deb"):
                try:
                    found.append(open_deb(os.path.join(top, name), check_data=False))
                except Refused as e:
                    skipped.append(e.message())
    return found, skipped


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return _sha256(fh)


def _sha256(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := fh.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def stage(debs: list[Deb], folder: str) -> list[str]:
    """Copy debs into folder (bound into the container) and check that each copy is the
    file that was checked (its sha256); the copies' names, in order."""
    names = []
    for i, deb in enumerate(debs):
        name = f"{i:03d}-{deb.name}.deb"
        dst = os.path.join(folder, name)
        try:
            shutil.copyfile(deb.path, dst)
        except OSError as e:
            raise refuse(deb.given, f"cannot copy it: {e.strerror}") from None
        if file_sha256(dst) != deb.sha256:
            raise refuse(deb.given, "changed after it was checked; nothing was installed")
        names.append(name)
    return names

