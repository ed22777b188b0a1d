"""What servicing reads before it changes anything: a Debian root, as an index read straight
from the image (no mount) or as a mounted directory.

Both resolve symlinks inside the root, as the image's own programs would see them in their
container: an absolute target starts again at the root and ".." stops there, so no read
ever leaves the image, whatever its symlinks say.  What is read is bounded (`limit`): a
crafted image cannot make planning read gigabytes.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Protocol

from imagefs.errors import CorruptImage, NoSuchPath, NotADirectory, Refused
from imagefs.format import layout as F
from imagefs.format.view import IndexView

MAX_READ = 64 << 20  # more than any dpkg database or control file
MAX_SYMLINK_HOPS = 40


class Root(Protocol):
    """A Debian root to read from."""

    label: str  # for messages: "index 2 (web)", "/mnt/x"

    def read(self, path: str, limit: int = MAX_READ) -> bytes | None:
        """The bytes of the regular file at path (absolute, inside the root); None when
        there is none.  CorruptImage if it is not a regular file or is over limit."""
        ...

    def names(self, path: str) -> list[str] | None:
        """The names in the directory at path; None when there is none."""
        ...


class IndexRoot:
    """An index of an image, read without mounting it."""

    def __init__(self, view: IndexView) -> None:
        self.view = view
        self.label = f"index {view.number} ({view.entry.name})"

    def read(self, path: str, limit: int = MAX_READ) -> bytes | None:
        view = self.view
        try:
            ino = view.lookup(path)
        except (NoSuchPath, NotADirectory):
            return None
        if ino.kind != F.REG:
            raise CorruptImage(view.image.path, f"{self.label}: {path} is not a file")
        if ino.size > limit:
            raise CorruptImage(view.image.path, f"{self.label}: {path} is {ino.size} bytes, "
                                                f"more than {limit} expected")
        out = bytearray()
        while len(out) < ino.size:
            data = view.read(ino, len(out), ino.size - len(out))
            if not data:
                break
            out += data
        return bytes(out)

    def names(self, path: str) -> list[str] | None:
        try:
            ino = self.view.lookup(path)
        except (NoSuchPath, NotADirectory):
            return None
        if ino.kind != F.DIR:
            return None
        return [os.fsdecode(name) for name, _kind, _ref in ino.entries]


class MountRoot:
    """A directory holding a root (a writable mount), its symlinks resolved inside it."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.label = self.path

    def resolve(self, path: str) -> str | None:
        """The host path of path inside the root, every symlink on the way resolved inside
        the root; None if a component is missing."""
        parts = [p for p in path.split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            here = os.path.join(self.path, *done, name)
            try:
                st = os.lstat(here)
            except (FileNotFoundError, NotADirectoryError):
                return None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None
                target = os.readlink(here)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done.append(name)
        return os.path.join(self.path, *done)

    def read(self, path: str, limit: int = MAX_READ) -> bytes | None:
        real = self.resolve(path)
        if real is None:
            return None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise CorruptImage(self.path, f"{path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptImage(self.path, f"{path} is not a file")
            if st.st_size > limit:
                raise CorruptImage(self.path, f"{path} is {st.st_size} bytes, more than "
                                              f"{limit} expected")
            return fh.read(limit + 1)[:limit]

    def names(self, path: str) -> list[str] | None:
        real = self.resolve(path)
        if real is None or not os.path.isdir(real) or os.path.islink(real):
            return None
        return sorted(os.listdir(real))


def make_dirs(root: MountRoot, path: str, mode: int = 0o755,
              made: list[str] | None = None) -> str:
    """The host path of directory path inside root, made (with mode) where missing, each
    one made appended to made; every existing component's symlinks resolved inside the
    root, and one that is not a directory refused."""
    parts = [p for p in path.split("/") if p]
    real = root.path
    for i, part in enumerate(parts):
        sub = "/" + "/".join(parts[: i + 1])
        found = root.resolve(sub)
        if found is None:
            found = os.path.join(real, part)
            try:
                os.mkdir(found, mode)
            except FileExistsError:  # a symlink that leads nowhere
                raise Refused(f"{sub} in the image is a broken symlink") from None
            os.chmod(found, mode)
            if made is not None:
                made.append(sub)
        elif not os.path.isdir(found) or os.path.islink(found):
            raise Refused(f"{sub} in the image is not a directory")
        real = found
    return real


def write_file(directory: str, name: str, data: bytes, mode: int = 0o644) -> None:
    """Write name in directory (a host path inside the root, from make_dirs) whole: a new
    file renamed over any old one, never through a symlink."""
    tmp = os.path.join(directory, f".{name}.imagefs-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.rename(tmp, os.path.join(directory, name))
    except BaseException as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(e, IsADirectoryError):
            raise Refused(f"{name} in the image is a directory") from None
        raise
