"""A private copy of the part of an image that systemd's unit-file logic reads: its unit
search path and preset directories, with every symlink on the way and every file their
symlinks point to, copied straight from the index (no mount) into a local directory.

Why a copy: the host's `systemctl --root=DIR` is the engine of `feature list` and of every
feature plan (its states are the answer by definition, so nothing of systemd's logic is
redone here), and `list-unit-files` makes ~75,000 opens and ~28,000 directory reads on
bookworm-minbase (O(units x search directories)): 1.4 s on a local directory, 1.5 s on a
read-only imagefs mount once that has started (1.6 s), 16-20 s on a writable session
mount (transaction.opened: its lookups are not cached by the kernel).  The unit
directories of a Debian root are ~300 small files, copied from the image in ~0.1 s: a
listing costs ~1.1 s in all, and a plan needs no mount.

The copy is exact where systemd looks (names, file contents, symlink targets as they are),
and made safely from anybody's image: symlinks are resolved in image space, component by
component, and each is recreated as a symlink; nothing is ever written through a symlink
(every parent of a written path is a directory this copy made), and what is copied is
bounded (MAX_NODES, MAX_BYTES: a crafted image is refused, not followed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from imagefs.errors import CorruptImage, one_line
from imagefs.format import layout as F
from imagefs.format.records import Inode
from imagefs.format.view import IndexView
from imagefs.places import run_dir

from .roots import IndexRoot, MountRoot, Root

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# systemd 252's system unit search path (`systemd-analyze --system unit-paths`); the
# host's own list is asked for once (unit_dirs), this is the fallback.
UNIT_DIRS = ("/etc/systemd/system.control", "/run/systemd/system.control",
             "/run/systemd/transient", "/run/systemd/generator.early", "/etc/systemd/system",
             "/etc/systemd/system.attached", "/run/systemd/system",
             "/run/systemd/system.attached", "/run/systemd/generator",
             "/usr/local/lib/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system", "/run/systemd/generator.late")
PRESET_DIRS = ("/etc/systemd/system-preset", "/run/systemd/system-preset",
               "/usr/local/lib/systemd/system-preset", "/lib/systemd/system-preset",
               "/usr/lib/systemd/system-preset")
MAX_NODES = 50_000  # files, directories and symlinks copied at most
MAX_BYTES = 128 << 20  # bytes of file content copied at most
MAX_DEPTH = 4  # directory levels below a search directory (system/x.wants/, x.service.d/)
MAX_HOPS = 40  # symlinks followed on one path


@dataclass(frozen=True)
class Node:
    """What is at a path, not following a symlink there: its kind ('dir', 'reg', 'lnk' or
    'other'), a symlink's target, a file's size."""

    kind: str
    target: bytes = b""
    size: int = 0


class Source(Protocol):
    """A root to copy from; every path given is real (no symlink among its parents)."""

    label: str

    def node(self, path: bytes) -> Node | None: ...

    def names(self, path: bytes) -> list[bytes]: ...

    def data(self, path: bytes, size: int) -> bytes: ...


class ViewSource:
    """An index read straight from the image."""

    def __init__(self, view: IndexView) -> None:
        self.view, self.label = view, f"index {view.number} ({view.entry.name})"
        self._inodes: dict[bytes, Inode | None] = {}

    def _inode(self, path: bytes) -> Inode | None:
        """The inode at a real path, each directory on the way decoded once."""
        if path not in self._inodes:
            head, _sep, name = path.rpartition(b"/")
            if not name:
                found: Inode | None = self.view.root()
            else:
                parent = self._inode(head or b"/")
                found = (self.view.child(parent, name)
                         if parent is not None and parent.kind == F.DIR else None)
            self._inodes[path] = found
        return self._inodes[path]

    def node(self, path: bytes) -> Node | None:
        ino = self._inode(path)
        if ino is None:
            return None
        kind = {F.DIR: "dir", F.REG: "reg", F.LNK: "lnk"}.get(ino.kind, "other")
        return Node(kind, ino.target, ino.size)

    def names(self, path: bytes) -> list[bytes]:
        ino = self._inode(path)
        return [name for name, _kind, _ref in ino.entries] if ino is not None else []

    def data(self, path: bytes, size: int) -> bytes:
        ino = self._inode(path)
        out = bytearray()
        while ino is not None and len(out) < size:
            part = self.view.read(ino, len(out), size - len(out))
            if not part:
                break
            out += part
        return bytes(out)


class DirSource:
    """A root that is a directory (a writable mount)."""

    def __init__(self, root: str) -> None:
        self.root, self.label = os.fsencode(os.path.abspath(root)), root

    def node(self, path: bytes) -> Node | None:
        try:
            st = os.lstat(self.root + path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode):
            return Node("lnk", os.readlink(self.root + path))
        if stat.S_ISDIR(st.st_mode):
            return Node("dir")
        return Node("reg" if stat.S_ISREG(st.st_mode) else "other", size=st.st_size)

    def names(self, path: bytes) -> list[bytes]:
        return sorted(os.listdir(self.root + path))

    def data(self, path: bytes, size: int) -> bytes:
        fd = os.open(self.root + path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(size)


def source_of(root: Root) -> Source:
    if isinstance(root, IndexRoot):
        return ViewSource(root.view)
    if isinstance(root, MountRoot):
        return DirSource(root.path)
    raise TypeError(f"cannot copy the unit files of {root!r}")


@cache
def unit_dirs() -> tuple[str, ...]:
    """The host systemd's system unit search path (it is the host's systemctl that reads
    the copy), or UNIT_DIRS when it cannot say."""
    exe = shutil.which("systemd-analyze", path=HOST_PATH)
    if exe is None:
        return UNIT_DIRS
    try:
        out = subprocess.run([exe, "--system", "unit-paths"], capture_output=True,
                             env={"PATH": HOST_PATH, "LC_ALL": "C.UTF-8"}, timeout=30,
                             stdin=subprocess.DEVNULL, text=True)
    except (OSError, subprocess.TimeoutExpired):
        return UNIT_DIRS
    found = tuple(p for p in out.stdout.split() if p.startswith("/"))
    return found if out.returncode == 0 and found else UNIT_DIRS


@contextlib.contextmanager
def unit_tree(root: Root, scratch: str | None = None) -> Iterator[str]:
    """A local directory holding a copy of root's unit files (see the module), removed
    afterwards; scratch: where to make it (None: see _private_dir)."""
    dest = (tempfile.mkdtemp(prefix="imagefs-units-", dir=scratch) if scratch is not None
            else _private_dir())
    try:
        copy_units(source_of(root), dest)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _private_dir() -> str:
    """RUN_DIR/servicing/PID-units-XXXX, which `imagefs cleanup --all` removes once this
    process is gone (killed), as it does a servicing workspace; where this process cannot
    write (a daemon listing as a user), a directory in the system's temporary one."""
    base = os.path.join(run_dir(), "servicing")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-units-", dir=base)
    except OSError:
        return tempfile.mkdtemp(prefix="imagefs-units-")


def copy_units(src: Source, dest: str) -> None:
    copier = _Copier(src, dest)
    for top in (*unit_dirs(), *PRESET_DIRS):
        real = copier.resolve(os.fsencode(top))
        if real is not None:
            copier.copy(real, 0)


def _parts(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p and p != b"."]


def _join(parts: list[bytes]) -> bytes:
    return b"/" + b"/".join(parts)


def resolve(src: Source, path: bytes, seen: Callable[[bytes, Node], None] | None = None,
            follow: bool = True) -> bytes | None:
    """The real path of path in src: every symlink on the way resolved in image space (an
    absolute target starts again at the root, ".." stops there), the last one too if
    follow; None when it leads nowhere.  seen(path, node) is told of each component."""
    parts, real, hops = _parts(path), list[bytes](), 0
    while parts:
        name = parts.pop(0)
        if name == b"..":
            if real:
                real.pop()
            continue
        here = _join([*real, name])
        node = src.node(here)
        if node is None:
            return None
        if seen is not None:
            seen(here, node)
        if node.kind == "lnk" and (parts or follow):
            hops += 1
            if hops > MAX_HOPS:
                return None
            parts = _parts(node.target) + parts
            real = [] if node.target.startswith(b"/") else real
            continue
        if parts and node.kind != "dir":
            return None
        real.append(name)
    return _join(real)


def peek(src: Source, path: str) -> Node | None:
    """What is at path in src, the last component not followed (lstat in image space)."""
    real = resolve(src, os.fsencode(path), follow=False)
    return src.node(real) if real is not None and real != b"/" else None


class _Copier:
    """Copies paths of src into dest; `made` records what exists in dest (kind by path)."""

    def __init__(self, src: Source, dest: str) -> None:
        self.src, self.dest = src, os.fsencode(dest)
        self.made: dict[bytes, str] = {b"/": "dir"}
        self.copied: set[bytes] = set()  # directories copied whole
        self.nodes = self.bytes = 0

    def resolve(self, path: bytes) -> bytes | None:
        """The real path of path, making in dest the directories and symlinks on the
        way; None when it leads nowhere."""
        return resolve(self.src, path, self.make)

    def copy(self, real: bytes, depth: int) -> None:
        """Copy the directory at real, its subdirectories to MAX_DEPTH, and what each of
        its symlinks leads to."""
        if real in self.copied or self.made.get(real) != "dir":
            return
        self.copied.add(real)
        for name in self.src.names(real):
            here = real.rstrip(b"/") + b"/" + name
            node = self.src.node(here)
            if node is None:
                continue
            self.make(here, node)
            if node.kind == "dir" and depth < MAX_DEPTH:
                self.copy(here, depth + 1)
            elif node.kind == "lnk":
                final = self.resolve(here)
                if final is not None and self.made.get(final) == "dir" and depth < MAX_DEPTH:
                    self.copy(final, depth + 1)

    def make(self, path: bytes, node: Node) -> None:
        """Make path in dest as node is (a file with its content; other kinds are not
        needed and left out), once; its parent is a directory made before."""
        if path in self.made:
            return
        parent = path.rsplit(b"/", 1)[0] or b"/"
        if self.made.get(parent) != "dir":
            raise AssertionError(f"{path!r}: parent not made")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CorruptImage(self.src.label, f"its systemd unit directories hold more "
                                               f"than {MAX_NODES} entries")
        target = self.dest + path
        if node.kind == "dir":
            os.mkdir(target, 0o755)
        elif node.kind == "lnk":
            os.symlink(node.target, target)
        elif node.kind == "reg":
            self.bytes += node.size
            if self.bytes > MAX_BYTES:
                raise CorruptImage(self.src.label, f"its systemd unit files hold more than "
                                                   f"{MAX_BYTES >> 20} MiB")
            self._write(target, self.src.data(path, node.size))
        self.made[path] = node.kind

    @staticmethod
    def _write(target: bytes, data: bytes) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)


def shown(path: bytes | str) -> str:
    """A path of the image for a message, on one line."""
    return one_line(os.fsdecode(path))
