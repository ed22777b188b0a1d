"""Writable mounts against a model: random sequences of POSIX operations applied to a
writable mount and to a plain directory (the model, on the local filesystem) give the same
results, errno included, and the same tree: during the session, after `imagefs commit`,
after a crash (SIGKILL of the mount process) and `imagefs remount`, and in a read-only
mount of the committed index.

A hypothesis state machine: each example starts a fresh writable session on a copy of an
image of a small base tree (a sparse 300 KB file, a cross-directory hardlink pair, a
symlink, two directories, xattrs, explicit times and owners) and a `cp -a` copy of the
same tree as the model.  Every rule applies one operation to both and compares the
outcomes; an invariant compares the trees.

What the trees are compared on: the names, and for each the type, mode, size (not for
directories), nlink, owner, content, symlink target, device numbers, user.* xattrs, which
names share an inode, and the mtime of every inode whose mtime was set explicitly (by the
base tree or by utime) and not touched by any operation since.  Automatic times, atime,
ctime, st_blocks and the placement of holes are the filesystem's own and not compared.

Every mount is unmounted in the example's teardown, also when it fails, and once more at
the end of the test function for anything left over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import is_mounted, mounted, pid_alive, run_imagefs, unmount_hard, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

INDEX = "base"
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

# Names collide often: files, two directories and names inside them, so that names,
# files and directories move into and over each other.
NAMES = ("a", "b", "c", "big", "d", "d/x", "d/y", "e", "e/z", "e/z/w")
BIG = 300_000
HOLE = (120_000, 200_000)  # big has a hole here in the base

names = st.sampled_from(NAMES)
offsets = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 16_383, 65_536, 100_000, 119_999, 131_072, 150_000,
                     199_999, 200_000, 299_999, BIG, BIG + 1, 400_000, 1_000_000]),
    st.integers(0, BIG + 10_000))
lengths = st.one_of(st.sampled_from([0, 1, 10, 4096, 65_536, 70_000, 200_000]),
                    st.integers(0, 5000))
sizes = st.one_of(
    st.sampled_from([0, 1, 5, 4096, 65_536, 120_000, 150_000, 299_999, BIG, BIG + 1,
                     1 << 20]),
    st.integers(0, BIG + 10_000))
seeds = st.integers(0, 1 << 16)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o1777, 0o2775, 0o6711])
ids = st.sampled_from([-1, 0, 1000, 1234])
times = st.integers(0, 2_000_000_000 * 10**9).map(lambda t: t - t % 7)
targets = st.sampled_from(["a", "big", "d", "d/x", "../a", "x", "nowhere", "e/z"])
xattr_names = st.sampled_from(["user.x", "user.y"])
xattr_values = st.sampled_from([b"", b"1", b"value", b"v" * 300])


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_base(src: Path) -> None:
    """The base tree; every time explicit (the model keeps them through cp -a)."""
    src.mkdir()
    (src / "d").mkdir()
    with open(src / "big", "wb") as fh:
        fh.write(payload(1, HOLE[0]))
        fh.seek(HOLE[1])
        fh.write(payload(2, BIG - HOLE[1]))
    (src / "a").write_bytes(b"hello\n")
    os.chmod(src / "a", 0o640)
    os.setxattr(src / "a", "user.x", b"base")
    (src / "b").write_bytes(payload(3, 5000))
    os.chown(src / "b", 1000, 1000)
    os.link(src / "b", src / "d" / "y")
    (src / "d" / "x").write_bytes(b"x-file\n")
    (src / "e").mkdir(mode=0o700)
    (src / "e" / "z").write_bytes(b"z" * 70_000)
    os.setxattr(src / "d", "user.y", b"dir")
    os.symlink("a", src / "c")
    for i, rel in enumerate(["big", "a", "b", "d/x", "c", "e/z", "d", "e", "."]):
        t = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(src / rel, ns=(t, t), follow_symlinks=False)


@dataclass
class Entry:
    fields: dict[str, object]
    ino: int
    mtime_ns: int


def snapshot(root: str) -> dict[str, Entry]:
    """Every name under root (root itself as "."), with what is compared."""
    out: dict[str, Entry] = {}

    def add(path: str, rel: str) -> None:
        s = os.lstat(path)
        f: dict[str, object] = {"type": stat.S_IFMT(s.st_mode), "mode": s.st_mode,
                                "nlink": s.st_nlink, "uid": s.st_uid, "gid": s.st_gid}
        if not stat.S_ISDIR(s.st_mode):
            f["size"] = s.st_size
        if stat.S_ISREG(s.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                chunks = []
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                f["content"] = b"".join(chunks)
            finally:
                os.close(fd)
        if stat.S_ISLNK(s.st_mode):
            f["target"] = os.readlink(path)
        if stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
            f["rdev"] = s.st_rdev
        f["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False)
                       for n in sorted(os.listxattr(path, follow_symlinks=False))
                       if n.startswith("user.")}
        out[rel] = Entry(f, s.st_ino, s.st_mtime_ns)

    add(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            add(p, os.path.relpath(p, root))
    return out


def link_groups(snap: dict[str, Entry]) -> set[frozenset[str]]:
    by_ino: dict[int, set[str]] = {}
    for rel, e in snap.items():
        if e.fields["type"] != stat.S_IFDIR:
            by_ino.setdefault(e.ino, set()).add(rel)
    return {frozenset(g) for g in by_ino.values() if len(g) > 1}


@dataclass
class Side:
    """One of the two trees an operation runs on, with its open handle (if any)."""

    root: str
    fd: int | None = None

    def p(self, name: str) -> str:
        return os.path.join(self.root, name)


Outcome = tuple[str, object]
Op = Callable[[Side], object]


def attempt(op: Op, side: Side) -> Outcome:
    try:
        return ("ok", op(side))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


def _check(ret: int) -> int:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def renameat2(old: str, new: str, flags: int) -> int:
    return _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                                  flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    return _check(_libc.fallocate(fd, mode, offset, length))


def fsync_tree(root: str) -> None:
    """fsync every directory and regular file under root."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, n) for n in filenames)]:
            s = os.lstat(path)
            if stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def rw_entry(mnt: str) -> dict | None:
    """This mount point's writable session in `imagefs mounts --json`."""
    for e in json.loads(run_imagefs("mounts", "--json").stdout):
        if e.get("mountpoint") == mnt and e.get("mode") == "rw":
            return e
    return None


@dataclass
class Context:
    """What the examples of one test function share."""

    root: Path
    image: Path
    src: Path
    count: int = 0
    mountpoints: list[str] = field(default_factory=list)

    def next_dir(self) -> Path:
        self.count += 1
        d = self.root / f"ex{self.count}"
        d.mkdir()
        return d


class RWModel(RuleBasedStateMachine):
    ctx: Context

    def __init__(self) -> None:
        super().__init__()
        self.ok = True  # False while a step runs: a failed step skips teardown's checks
        self.dir = self.ctx.next_dir()
        self.image = str(self.dir / "img.imagefs")
        shutil.copyfile(self.ctx.image, self.image)
        self.model = str(self.dir / "model")
        subprocess.run(["cp", "-a", str(self.ctx.src), self.model], check=True)
        self.mnt = os.path.realpath(self.dir / "mnt")
        os.mkdir(self.mnt)
        self.ctx.mountpoints.append(self.mnt)
        rec = json.loads(run_imagefs("mount", "--rw", self.image, INDEX, self.mnt,
                                     "--json", timeout=60).stdout)
        self.pid: int = rec["pid"]
        self.log_path: str = rec.get("log", "")
        self.sides = (Side(self.model), Side(self.mnt))
        self.commits = 0
        self.crashes = 0
        # model inode -> the mtime set explicitly on it, while no operation touched it
        self.explicit = {e.ino: e.mtime_ns for e in snapshot(self.model).values()}

    # --- running an operation on both trees ----------------------------------------------

    def _inos(self, paths: list[str]) -> set[int]:
        found = set()
        model = self.sides[0]
        for name in paths:
            for p in (model.p(name), model.p(os.path.dirname(name))):
                for f in (os.lstat, os.stat):
                    with contextlib.suppress(OSError):
                        found.add(f(p).st_ino)
        if model.fd is not None:
            found.add(os.fstat(model.fd).st_ino)
        return found

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-15:])
        except OSError:
            return ""

    def both(self, desc: str, op: Op, paths: list[str]) -> Outcome:
        """Apply op to the model, then to the mount: the same outcome, errno included."""
        touched = self._inos(paths)
        want = attempt(op, self.sides[0])
        got = attempt(op, self.sides[1])
        for ino in touched | self._inos(paths):
            self.explicit.pop(ino, None)
        assert got == want, (
            f"{desc}: the plain directory gives {want!r:.300}, the mount {got!r:.300}\n"
            f"mount log:\n{self.log_tail()}")
        return want

    # --- comparing the trees -------------------------------------------------------------

    def compare(self, where: str, mount_root: str | None = None) -> dict[str, Entry]:
        """The model and the mount hold the same tree; returns the mount's snapshot."""
        a = snapshot(self.model)
        b = snapshot(mount_root or self.mnt)
        assert sorted(a) == sorted(b), f"{where}: names differ: plain {sorted(a)}, " \
                                       f"mount {sorted(b)}"
        for rel, ea in a.items():
            eb = b[rel]
            for k, v in ea.fields.items():
                assert eb.fields.get(k) == v, (
                    f"{where}: {rel}: {k} differs: plain {v!r:.200}, "
                    f"mount {eb.fields.get(k)!r:.200}\nmount log:\n{self.log_tail()}")
            want = self.explicit.get(ea.ino)
            if want is not None and ea.mtime_ns == want:
                assert eb.mtime_ns == want, (
                    f"{where}: {rel}: mtime set to {want}, mount has {eb.mtime_ns}")
        assert link_groups(a) == link_groups(b), f"{where}: hardlinks differ"
        return b

    def commit_keeping_mount(self, where: str) -> None:
        """`imagefs commit`: nothing changes that can be seen, inode numbers included (the
        kernel holds them)."""
        before = {rel: e.ino for rel, e in snapshot(self.mnt).items()}
        run_imagefs("commit", self.mnt, timeout=120)
        after = self.compare(where)
        moved = {rel: (ino, after[rel].ino) for rel, ino in before.items()
                 if after[rel].ino != ino}
        assert not moved, f"{where}: inode numbers changed: {moved}"

    @invariant()
    def same_tree(self) -> None:
        self.ok = False
        self.compare("during the session")
        self.ok = True

    # --- rules ---------------------------------------------------------------------------

    @rule(name=names, offset=offsets, n=lengths, seed=seeds,
          how=st.sampled_from(["plain", "trunc", "append", "excl", "nocreat"]),
          mode=st.sampled_from([0o644, 0o600, 0o755]))
    def write(self, name: str, offset: int, n: int, seed: int, how: str, mode: int) -> None:
        self.ok = False
        data = payload(seed, n)
        flags = os.O_WRONLY | os.O_NONBLOCK | {
            "plain": os.O_CREAT, "trunc": os.O_CREAT | os.O_TRUNC,
            "append": os.O_CREAT | os.O_APPEND, "excl": os.O_CREAT | os.O_EXCL,
            "nocreat": 0}[how]

        def op(s: Side) -> object:
            fd = os.open(s.p(name), flags, mode)
            try:
                w = os.write(fd, data) if how == "append" else os.pwrite(fd, data, offset)
                return w, os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(f"write {name} {how} at {offset}, {n} bytes", op, [name])
        self.ok = True

    @rule(name=names, offset=offsets, n=lengths)
    def read(self, name: str, offset: int, n: int) -> None:
        self.ok = False

        def op(s: Side) -> object:
            fd = os.open(s.p(name), os.O_RDONLY | os.O_NONBLOCK)
            try:
                return os.pread(fd, n, offset)
            finally:
                os.close(fd)

        self.both(f"read {name} at {offset}, {n} bytes", op, [])
        self.ok = True

    @rule(name=names, size=sizes, through_fd=st.booleans())
    def truncate(self, name: str, size: int, through_fd: bool) -> None:
        self.ok = False

        def op(s: Side) -> object:
            if not through_fd:
                os.truncate(s.p(name), size)
                return None
            fd = os.open(s.p(name), os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.ftruncate(fd, size)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(f"truncate {name} to {size}" + (" (ftruncate)" if through_fd else ""),
                  op, [name])
        self.ok = True

    @rule(name=names, mode=st.sampled_from([
        0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]),
          offset=offsets, n=lengths)
    def fallocate(self, name: str, mode: int, offset: int, n: int) -> None:
        self.ok = False

        def op(s: Side) -> object:
            fd = os.open(s.p(name), os.O_WRONLY | os.O_NONBLOCK)
            try:
                fallocate(fd, mode, offset, n)
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(f"fallocate {name} mode {mode:#x} at {offset}, {n} bytes", op, [name])
        self.ok = True

    @rule(name=names)
    def unlink(self, name: str) -> None:
        self.ok = False
        self.both(f"unlink {name}", lambda s: os.unlink(s.p(name)), [name])
        self.ok = True

    @rule(name=names, mode=st.sampled_from([0o755, 0o700, 0o2775]))
    def mkdir(self, name: str, mode: int) -> None:
        self.ok = False
        self.both(f"mkdir {name} {mode:o}", lambda s: os.mkdir(s.p(name), mode), [name])
        self.ok = True

    @rule(name=names)
    def rmdir(self, name: str) -> None:
        self.ok = False
        self.both(f"rmdir {name}", lambda s: os.rmdir(s.p(name)), [name])
        self.ok = True

    @rule(name=names, kind=st.sampled_from([stat.S_IFIFO, stat.S_IFCHR]))
    def mknod(self, name: str, kind: int) -> None:
        """A fifo, or a character device (1, 3): /dev/null, harmless to open and write."""
        self.ok = False
        self.both(f"mknod {name} {kind:o}",
                  lambda s: os.mknod(s.p(name), kind | 0o666, os.makedev(1, 3)), [name])
        self.ok = True

    @rule(old=names, new=names,
          flags=st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, old: str, new: str, flags: int) -> None:
        self.ok = False
        self.both(f"rename {old} -> {new} flags {flags}",
                  lambda s: renameat2(s.p(old), s.p(new), flags), [old, new])
        self.ok = True

    @rule(old=names, new=names, follow=st.booleans())
    def link(self, old: str, new: str, follow: bool) -> None:
        self.ok = False
        self.both(f"link {old} -> {new} follow={follow}",
                  lambda s: os.link(s.p(old), s.p(new), follow_symlinks=follow), [old, new])
        self.ok = True

    @rule(to=targets, name=names)
    def symlink(self, to: str, name: str) -> None:
        self.ok = False
        self.both(f"symlink {name} -> {to}", lambda s: os.symlink(to, s.p(name)), [name])
        self.ok = True

    @rule(name=names, mode=modes)
    def chmod(self, name: str, mode: int) -> None:
        self.ok = False
        self.both(f"chmod {name} {mode:o}", lambda s: os.chmod(s.p(name), mode), [name])
        self.ok = True

    @rule(name=names, uid=ids, gid=ids, follow=st.booleans())
    def chown(self, name: str, uid: int, gid: int, follow: bool) -> None:
        self.ok = False
        self.both(f"chown {name} {uid}:{gid} follow={follow}",
                  lambda s: os.chown(s.p(name), uid, gid, follow_symlinks=follow), [name])
        self.ok = True

    @rule(name=names, atime=times, mtime=times, follow=st.booleans())
    def utime(self, name: str, atime: int, mtime: int, follow: bool) -> None:
        self.ok = False
        out = self.both(f"utime {name} mtime {mtime} follow={follow}",
                        lambda s: os.utime(s.p(name), ns=(atime, mtime),
                                           follow_symlinks=follow), [name])
        if out[0] == "ok":
            p = self.sides[0].p(name)
            self.explicit[(os.stat(p) if follow else os.lstat(p)).st_ino] = mtime
        self.ok = True

    @rule(name=names, attr=xattr_names, value=xattr_values,
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
          follow=st.booleans())
    def setxattr(self, name: str, attr: str, value: bytes, flags: int, follow: bool) -> None:
        self.ok = False
        self.both(f"setxattr {name} {attr}={value!r:.20} flags {flags} follow={follow}",
                  lambda s: os.setxattr(s.p(name), attr, value, flags,
                                        follow_symlinks=follow), [name])
        self.ok = True

    @rule(name=names, attr=xattr_names, follow=st.booleans())
    def removexattr(self, name: str, attr: str, follow: bool) -> None:
        self.ok = False
        self.both(f"removexattr {name} {attr} follow={follow}",
                  lambda s: os.removexattr(s.p(name), attr, follow_symlinks=follow), [name])
        self.ok = True

    # --- an open handle, kept across other operations (unlink, rename, commit) ----------

    @precondition(lambda self: self.sides[0].fd is None)
    @rule(name=names, how=st.sampled_from(["rdwr", "append", "rdonly", "creat"]))
    def open_handle(self, name: str, how: str) -> None:
        self.ok = False
        flags = os.O_NONBLOCK | {"rdwr": os.O_RDWR, "append": os.O_RDWR | os.O_APPEND,
                                 "rdonly": os.O_RDONLY, "creat": os.O_RDWR | os.O_CREAT}[how]
        model, mount = self.sides
        model.fd = mount.fd = None
        try:
            model.fd = os.open(model.p(name), flags, 0o644)
        except OSError as e:
            want: Outcome = ("err", errno.errorcode[e.errno or 0])
        else:
            want = ("ok", None)
        try:
            mount.fd = os.open(mount.p(name), flags, 0o644)
        except OSError as e:
            got: Outcome = ("err", errno.errorcode[e.errno or 0])
        else:
            got = ("ok", None)
        for ino in self._inos([name]):
            self.explicit.pop(ino, None)
        assert got == want, f"open {name} {how}: plain {want}, mount {got}"
        self.ok = True

    @precondition(lambda self: self.sides[0].fd is not None)
    @rule(what=st.sampled_from(["pwrite", "write", "pread", "ftruncate", "fsync", "fstat",
                                "punch", "zero"]),
          offset=offsets, n=lengths, seed=seeds)
    def use_handle(self, what: str, offset: int, n: int, seed: int) -> None:
        self.ok = False
        data = payload(seed, n)

        def op(s: Side) -> object:
            fd = s.fd
            assert fd is not None
            if what == "pwrite":
                os.pwrite(fd, data, offset)
            elif what == "write":
                os.write(fd, data)
            elif what == "pread":
                return os.pread(fd, n, offset)
            elif what == "ftruncate":
                os.ftruncate(fd, offset)
            elif what == "fsync":
                os.fsync(fd)
            elif what == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)
            elif what == "zero":
                fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, n)
            st_ = os.fstat(fd)
            return st_.st_size, st_.st_nlink, stat.S_IFMT(st_.st_mode)

        self.both(f"handle {what} at {offset}, {n} bytes", op, [])
        self.ok = True

    def close_handles(self) -> None:
        for s in self.sides:
            if s.fd is not None:
                os.close(s.fd)
                s.fd = None

    @precondition(lambda self: self.sides[0].fd is not None)
    @rule()
    def close_handle(self) -> None:
        self.close_handles()

    # --- commit, crash and remount -------------------------------------------------------

    @precondition(lambda self: self.commits < 1)
    @rule()
    def commit(self) -> None:
        """A commit in the middle of the session changes nothing that can be seen."""
        self.ok = False
        self.commits += 1
        self.commit_keeping_mount("after a commit in the session")
        self.ok = True

    @precondition(lambda self: self.crashes < 1)
    @rule(commit_first=st.booleans())
    def crash_and_remount(self, commit_first: bool) -> None:
        """SIGKILL the mount process after a commit (or an fsync of every file and
        directory): `imagefs remount` serves the same tree."""
        self.ok = False
        self.crashes += 1
        self.close_handles()
        if commit_first:
            run_imagefs("commit", self.mnt, timeout=120)
        else:
            fsync_tree(self.mnt)
        entry = rw_entry(self.mnt)  # the mount process, as `imagefs mounts` names it
        assert entry is not None and entry["state"] == "live", entry
        assert entry["pid"] == self.pid, (entry, self.pid)
        os.kill(entry["pid"], signal.SIGKILL)
        assert wait_until(lambda: not pid_alive(self.pid), 10)
        # the guardian detaches the mount; the session is left stale
        assert wait_until(lambda: not is_mounted(self.mnt), 10)
        entry = rw_entry(self.mnt)
        assert entry is not None and entry["state"] == "stale", entry
        rec = json.loads(run_imagefs("remount", self.mnt, "--json", timeout=60).stdout)
        self.pid = rec["pid"]
        self.log_path = rec.get("log", self.log_path)
        assert is_mounted(self.mnt)
        self.compare("after SIGKILL and remount" + (" (committed)" if commit_first
                                                    else " (fsynced)"))
        self.ok = True

    # --- the end of an example -----------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.close_handles()
            if self.ok:
                self.finish()
        finally:
            self.cleanup()

    def finish(self) -> None:
        self.compare("at the end of the session")
        self.commit_keeping_mount("after the final commit")
        run_imagefs("unmount", self.mnt, "--commit", timeout=120)
        assert not is_mounted(self.mnt)
        assert wait_until(lambda: not pid_alive(self.pid), 10)
        verify = run_imagefs("verify", self.image, check=False, timeout=120)
        assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
        with mounted(self.image, INDEX, self.mnt) as rec:
            assert rec["mode"] == "ro"
            self.compare("in a read-only mount of the committed index")

    def cleanup(self) -> None:
        if is_mounted(self.mnt):
            run_imagefs("unmount", self.mnt, "--discard", check=False, timeout=60)
            unmount_hard(self.mnt, self.pid)
        if not is_mounted(self.mnt):
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    monkeypatch.setenv("IMAGEFS_STATE_DIR", str(tmp_path / "state"))
    src = tmp_path / "base"
    make_base(src)
    image = tmp_path / "base.imagefs"
    run_imagefs("capture", src, image, "--name", INDEX)
    ctx = Context(tmp_path, image, src)
    try:
        yield ctx
    finally:
        for mnt in ctx.mountpoints:
            if is_mounted(mnt):
                run_imagefs("unmount", mnt, "--discard", check=False, timeout=60)
                unmount_hard(mnt, None)


# Examples per run: 20, unless the run asks for another number (test_no_fast_paths runs
# this test again with the shim's fast paths off, with fewer in the default run).
EXAMPLES_ENV = "IMAGEFS_TEST_MODEL_EXAMPLES"


def test_rw_mount_matches_plain_directory(context: Context) -> None:
    """Random operation sequences: the same outcomes and trees as a plain directory."""

    class Machine(RWModel):
        ctx = context

    run_state_machine_as_test(Machine, settings=settings(
        max_examples=int(os.environ.get(EXAMPLES_ENV, "20")), stateful_step_count=35,
        deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much]))
