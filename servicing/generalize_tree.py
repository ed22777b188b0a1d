"""What generalize plans from: a Debian root seen WITHOUT following any symlink.

servicing.roots resolves symlinks inside the root, as the image's programs would see them.
Generalize removes files, so it must not: a `/root/.bash_history` that is a symlink to
`/etc/shadow` is removed as the symlink it is, and a home directory that is a symlink is
not entered at all.  A Tree answers lstat-like questions (`node`), lists real directories
(`names`) and reads regular files (`read`), every component of a path taken as it is: a
path with a symlink (or anything but a directory) before its last component does not
exist here.

Two kinds: IndexTree (an index read straight from the image, no mount: what --dry-run and
every plan use) and MountTree (a directory: a writable mount with --mount).  Names are
str, non-UTF-8 bytes kept as surrogate escapes (os.fsdecode), so that a planned path
names exactly the file it was planned from; `shown` gives the printable form.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from imagefs.errors import CorruptImage, Refused
from imagefs.format import layout as F
from imagefs.format.records import Inode
from imagefs.format.view import IndexView

from .roots import IndexRoot, MountRoot, Root

MAX_DEPTH = 256  # directories below a cleaned place (a crafted image cannot loop us)
MAX_PATHS = 2_000_000  # paths one plan may hold
MAX_SYMLINK_HOPS = 40

FILE, DIR, LINK, OTHER = "file", "dir", "link", "other"


@dataclass(frozen=True)
class Node:
    """What is at a path (never followed): its kind, size (a file's bytes), mode, owner and,
    for a symlink, its target."""

    kind: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    target: str = ""


class Tree(Protocol):
    label: str

    def node(self, path: str) -> Node | None:
        """What is at path; None when nothing is, or when a component before the last is
        not a real directory (a symlink is never followed)."""
        ...

    def names(self, path: str) -> list[str]:
        """The names in the real directory at path, sorted; [] when it is not one."""
        ...

    def read(self, path: str, limit: int) -> bytes | None:
        """The bytes of the regular file at path; None when it is not one or is over
        limit bytes."""
        ...


def shown(path: str) -> str:
    """path for a terminal, JSON or the history: valid UTF-8, odd bytes as \\xNN (the form
    `imagefs diff` uses)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def split(path: str) -> list[str]:
    """The names of an absolute path, ".." refused (plans only build clean paths)."""
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"{path!r}: '..' in a planned path")
    return parts


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


class IndexTree:
    """An index of an image, read without mounting; directories looked up once."""

    def __init__(self, view: IndexView) -> None:
        self.view = view
        self.label = f"index {view.number} ({view.entry.name})"
        self._dirs: dict[str, Inode] = {"/": view.root()}

    def _inode(self, path: str) -> Inode | None:
        parts = split(path)
        if not parts:
            return self._dirs["/"]
        parent = self._dir("/" + "/".join(parts[:-1]))
        if parent is None:
            return None
        return self.view.child(parent, os.fsencode(parts[-1]))

    def _dir(self, path: str) -> Inode | None:
        path = "/" + "/".join(split(path))
        found = self._dirs.get(path)
        if found is None:
            ino = self._inode(path)
            if ino is None or ino.kind != F.DIR:
                return None
            if len(self._dirs) > 4096:
                self._dirs = {"/": self._dirs["/"]}
            self._dirs[path] = found = ino
        return found

    def node(self, path: str) -> Node | None:
        ino = self._inode(path)
        if ino is None:
            return None
        kind = {F.REG: FILE, F.DIR: DIR, F.LNK: LINK}.get(ino.kind, OTHER)
        return Node(kind, ino.size if ino.kind == F.REG else 0, ino.mode & 0o7777, ino.uid,
                    ino.gid, os.fsdecode(ino.target) if ino.kind == F.LNK else "")

    def names(self, path: str) -> list[str]:
        d = self._dir(path)
        return [] if d is None else sorted(os.fsdecode(name) for name, _k, _r in d.entries)

    def read(self, path: str, limit: int) -> bytes | None:
        ino = self._inode(path)
        if ino is None or ino.kind != F.REG or ino.size > limit:
            return None
        out = bytearray()
        while len(out) < ino.size:
            data = self.view.read(ino, len(out), ino.size - len(out))
            if not data:
                raise CorruptImage(self.view.image.path, f"{self.label}: {shown(path)} is "
                                   "shorter than its size")
            out += data
        return bytes(out)


class MountTree:
    """A directory holding a root (a writable mount), looked at with lstat only."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.label = self.path
        self._dirs: set[str] = {"/"}

    def _host(self, path: str) -> str | None:
        """The host path of path, if every component before the last is a real directory."""
        parts = split(path)
        for i in range(len(parts) - 1):
            sub = "/" + "/".join(parts[: i + 1])
            if sub not in self._dirs:
                try:
                    st = os.lstat(os.path.join(self.path, *parts[: i + 1]))
                except (FileNotFoundError, NotADirectoryError):
                    return None
                if not stat.S_ISDIR(st.st_mode):
                    return None
                self._dirs.add(sub)
        return os.path.join(self.path, *parts)

    def node(self, path: str) -> Node | None:
        host = self._host(path)
        if host is None:
            return None
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return node_of(st, os.readlink(host) if stat.S_ISLNK(st.st_mode) else "")

    def names(self, path: str) -> list[str]:
        found = self.node(path)
        host = self._host(path)
        if found is None or found.kind != DIR or host is None:
            return []
        return sorted(os.listdir(host))

    def read(self, path: str, limit: int) -> bytes | None:
        host = self._host(path)
        if host is None:
            return None
        try:
            fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            return fh.read(limit + 1)[:limit]


def node_of(st: os.stat_result, target: str = "") -> Node:
    mode = st.st_mode
    kind = (FILE if stat.S_ISREG(mode) else DIR if stat.S_ISDIR(mode)
            else LINK if stat.S_ISLNK(mode) else OTHER)
    return Node(kind, st.st_size if kind == FILE else 0, stat.S_IMODE(mode), st.st_uid,
                st.st_gid, target)


def tree_of(root: Root) -> Tree:
    """The never-following Tree of what a servicing Root reads."""
    if isinstance(root, IndexRoot):
        return IndexTree(root.view)
    if isinstance(root, MountRoot):
        return MountTree(root.path)
    raise TypeError(f"generalize cannot plan from {type(root).__name__}")


def real_dir(tree: Tree, path: str) -> str | None:
    """The path of the real directory path leads to, its symlinks resolved inside the
    root (an absolute target starts again at the root, ".." stops there), as the image's
    own programs would find it; None when it leads to no directory."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, name])
        found = tree.node(here)
        if found is None:
            return None
        if found.kind == LINK:
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                return None
            if found.target.startswith("/"):
                done = []
            parts = [p for p in found.target.split("/") if p and p != "."] + parts
            continue
        if found.kind != DIR:
            return None
        done.append(name)
    return "/" + "/".join(done)


def below(tree: Tree, base: str) -> Iterator[tuple[str, Node]]:
    """Every path under the real directory base (not base itself), children before their
    directory (the order to remove them in).  Bounded: MAX_DEPTH levels, MAX_PATHS paths."""
    count = 0
    # An explicit stack: (directory, its remaining names, their nodes); a directory is
    # yielded once everything in it has been.
    stack: list[tuple[str, list[str]]] = [(base, tree.names(base)[::-1])]
    pending: list[tuple[str, Node]] = []
    while stack:
        where, todo = stack[-1]
        if not todo:
            stack.pop()
            if pending:
                yield pending.pop()
            continue
        path = join(where, todo.pop())
        found = tree.node(path)
        if found is None:
            continue
        count += 1
        if count > MAX_PATHS:
            raise Refused(f"more than {MAX_PATHS} paths under {shown(base)}: too many to "
                          "plan one by one")
        if found.kind == DIR:
            if len(stack) > MAX_DEPTH:
                raise Refused(f"{shown(path)}: directories nested over {MAX_DEPTH} deep")
            pending.append((path, found))
            stack.append((path, tree.names(path)[::-1]))
        else:
            yield path, found
