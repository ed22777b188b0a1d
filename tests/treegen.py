"""Generated source trees for the tests: one of every kind of inode and metadata imagefs
must keep (DESIGN.md requirement 8).  Needs root (devices, owners, trusted.* xattrs).

    from treegen import make_every_type_tree, EVERY_TYPE
    make_every_type_tree(tmp_path / "tree")

`EVERY_TYPE` names the interesting paths (relative to the root, as bytes) so tests can
point at them without repeating the layout.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# The big sparse file: 5 GiB apparent, data at 0, at 1 MiB and at 4.5 GiB, hole at the end.
BIG_SPARSE_SIZE = 5 * GiB
BIG_SPARSE_DATA = ((0, 4 * KiB), (1 * MiB, 4 * KiB), (4 * GiB + 512 * MiB, 4 * KiB))
# A small sparse file `cat` can print: hole, data, hole, data, trailing hole.
SMALL_SPARSE_SIZE = 3 * MiB
SMALL_SPARSE_DATA = ((256 * KiB, 100 * KiB), (1 * MiB + 17, 5000))

LONG_NAME = b"L" * 250 + b".long"  # 255 bytes
assert len(LONG_NAME) == 255

EVERY_TYPE = {
    "regular": b"files/regular.txt",
    "empty": b"files/empty",
    "random3m": b"files/random-3MiB.bin",
    "big_sparse": b"sparse/big-5GiB.img",
    "small_sparse": b"sparse/small.img",
    "chardev": b"dev/null-like",
    "blockdev": b"dev/loop0-like",
    "fifo": b"dev/fifo",
    "socket": b"dev/sock",
    "setuid": b"modes/setuid",
    "setgid": b"modes/setgid",
    "sticky_dir": b"modes/sticky-dir",
    "setgid_dir": b"modes/setgid-dir",
    "mode000": b"modes/mode-000",
    "ro_dir": b"modes/read-only-dir",
    "ro_dir_child": b"modes/read-only-dir/inside",
    "hardlink": (b"links/a/three", b"links/b/three-again", b"links/c/d/three-thrice"),
    "symlink_hardlink": (b"links/sym-hard-1", b"links/sym-hard-2"),
    "abs_symlink": b"links/abs",
    "rel_symlink": b"links/rel",
    "dangling": b"links/dangling",
    "dir_symlink": b"links/to-dir",
    "names_dir": b"names",
    "space": b"names/with space",
    "newline": b"names/new\nline",
    "non_utf8": b"names/caf\xe9",
    "long": b"names/" + LONG_NAME,
    "xattrs": b"xattrs/user-trusted",
    "xattr_symlink": b"xattrs/link-with-trusted",
    "capability": b"xattrs/ping-like",
    "acl_file": b"acl/file",
    "acl_dir": b"acl/dir",
    "acl_dir_child": b"acl/dir/inherits",
    "owner": b"owners/odd",
    "owner_symlink": b"owners/odd-link",
    "deep": b"deep/" + b"/".join(b"d%02d" % i for i in range(40)) + b"/bottom.txt",
}

NAMES_IN_NAMES_DIR = sorted([b"with space", b"new\nline", b"caf\xe9", LONG_NAME,
                             b"plain", b" leading-space", b"tab\there", b"-dash",
                             "ünïcødé".encode(), b"back\\slash"])


def _p(root: Path, rel: bytes) -> bytes:
    return os.fsencode(root) + b"/" + rel


def _write(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _mkdirs(path: bytes, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def make_every_type_tree(root: Path, seed: int = 1234) -> Path:
    """Create the tree at root (must not exist or be empty); returns root."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    r = os.fsencode(root)

    def P(rel: bytes) -> bytes:
        return r + b"/" + rel

    for d in (b"files", b"sparse", b"dev", b"modes", b"links/a", b"links/b", b"links/c/d",
              b"names", b"xattrs", b"acl", b"owners", b"deep"):
        _mkdirs(P(d))

    # --- regular files ---------------------------------------------------------------
    _write(P(EVERY_TYPE["regular"]), b"hello, imagefs\n" * 100)
    _write(P(EVERY_TYPE["empty"]), b"")
    _write(P(EVERY_TYPE["random3m"]), rng.randbytes(3 * MiB))
    # Small files with shared and distinct content (dedup inside one capture).
    for i in range(20):
        _write(P(b"files/small-%02d" % i), b"same content\n" if i % 2 else b"n%d\n" % i)
    # Exactly one chunk-min, one byte over, and a compressible 1 MiB file.
    _write(P(b"files/exact-16KiB"), rng.randbytes(16 * KiB))
    _write(P(b"files/16KiB-plus-1"), rng.randbytes(16 * KiB + 1))
    _write(P(b"files/zeros-1MiB-dense"), bytes(MiB))

    # --- sparse files -----------------------------------------------------------------
    fd = os.open(P(EVERY_TYPE["big_sparse"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, BIG_SPARSE_SIZE)
        for off, n in BIG_SPARSE_DATA:
            os.pwrite(fd, sparse_pattern(off, n), off)
    finally:
        os.close(fd)
    fd = os.open(P(EVERY_TYPE["small_sparse"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, SMALL_SPARSE_SIZE)
        for off, n in SMALL_SPARSE_DATA:
            os.pwrite(fd, sparse_pattern(off, n), off)
    finally:
        os.close(fd)
    # A file that is all hole.
    fd = os.open(P(b"sparse/all-hole"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, 8 * MiB)
    os.close(fd)

    # Big data regions between holes (chunking inside regions) and data up to EOF.
    fd = os.open(P(b"sparse/mixed.img"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, 64 * MiB)
        os.pwrite(fd, rng.randbytes(100 * KiB), 0)
        os.pwrite(fd, rng.randbytes(2 * MiB + 5), 10 * MiB)
        os.pwrite(fd, rng.randbytes(300 * KiB), 40 * MiB + 3)
    finally:
        os.close(fd)
    fd = os.open(P(b"sparse/hole-then-data"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"the end\n", 2 * MiB)
    finally:
        os.close(fd)

    # --- devices, fifo, socket ----------------------------------------------------------
    os.mknod(P(EVERY_TYPE["chardev"]), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(P(EVERY_TYPE["blockdev"]), 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(P(b"dev/big-numbers"), 0o600 | stat.S_IFCHR, os.makedev(4095, 1048575))
    os.mkfifo(P(EVERY_TYPE["fifo"]), 0o640)
    for rel, mode in ((EVERY_TYPE["chardev"], 0o666), (EVERY_TYPE["blockdev"], 0o660),
                      (b"dev/big-numbers", 0o600), (EVERY_TYPE["fifo"], 0o640)):
        os.chmod(P(rel), mode)  # mknod and mkfifo modes pass through the umask
    _make_socket(P(b"dev"), b"sock")

    # --- special modes ----------------------------------------------------------------
    _write(P(EVERY_TYPE["setuid"]), b"#!/bin/sh\n", 0o4755)
    _write(P(EVERY_TYPE["setgid"]), b"#!/bin/sh\necho g\n", 0o2711)
    _mkdirs(P(EVERY_TYPE["sticky_dir"]))
    os.chmod(P(EVERY_TYPE["sticky_dir"]), 0o1777)
    _write(P(EVERY_TYPE["sticky_dir"] + b"/tmpfile"), b"t\n", 0o600)
    _mkdirs(P(EVERY_TYPE["setgid_dir"]))
    os.chmod(P(EVERY_TYPE["setgid_dir"]), 0o2775)
    _write(P(EVERY_TYPE["mode000"]), b"secret\n", 0o000)
    _mkdirs(P(EVERY_TYPE["ro_dir"]))
    _write(P(EVERY_TYPE["ro_dir_child"]), b"inside a 0555 directory\n", 0o444)

    # --- hardlinks and symlinks -----------------------------------------------------
    a, b, c = EVERY_TYPE["hardlink"]
    _write(P(a), b"one inode, three names\n" * 50)
    os.link(P(a), P(b))
    os.link(P(a), P(c))
    os.symlink(b"/etc/hostname", P(EVERY_TYPE["abs_symlink"]))
    os.symlink(b"../files/regular.txt", P(EVERY_TYPE["rel_symlink"]))
    os.symlink(b"does/not/exist", P(EVERY_TYPE["dangling"]))
    os.symlink(b"c/d", P(EVERY_TYPE["dir_symlink"]))
    s1, s2 = EVERY_TYPE["symlink_hardlink"]
    os.symlink(b"a/three", P(s1))
    os.link(P(s1), P(s2), follow_symlinks=False)

    os.symlink(b"caf\xe9\nodd target", P(b"links/odd-target"))
    os.link(P(EVERY_TYPE["chardev"]), P(b"dev/null-hardlink"))
    _mkdirs(P(b"empty-dir"))

    # --- names ------------------------------------------------------------------------
    for name in NAMES_IN_NAMES_DIR:
        _write(P(b"names/" + name), b"name: " + name + b"\n")

    # --- xattrs, capabilities, ACLs -------------------------------------------------------
    x = P(EVERY_TYPE["xattrs"])
    _write(x, b"has xattrs\n")
    os.setxattr(x, b"user.comment", b"a user xattr")
    os.setxattr(x, b"user.empty", b"")
    os.setxattr(x, b"user.binary", bytes(range(256)))
    os.setxattr(x, b"user.big", rng.randbytes(1500))
    os.setxattr(x, b"trusted.overlay.opaque", b"y")
    os.symlink(b"user-trusted", P(EVERY_TYPE["xattr_symlink"]))
    os.setxattr(P(EVERY_TYPE["xattr_symlink"]), b"trusted.on-a-link", b"v",
                follow_symlinks=False)
    os.setxattr(P(b"dev"), b"user.on-a-dir", b"d")
    os.setxattr(P(EVERY_TYPE["chardev"]), b"trusted.on-a-device", b"c")

    cap = P(EVERY_TYPE["capability"])
    _write(cap, b"\x7fELF pretend\n", 0o755)
    subprocess.run([b"setcap", b"cap_net_raw+ep", cap], check=True)

    acl_file = P(EVERY_TYPE["acl_file"])
    _write(acl_file, b"acl\n", 0o640)
    subprocess.run([b"setfacl", b"-m", b"u:1234:rwx,g:4321:r", acl_file], check=True)
    acl_dir = P(EVERY_TYPE["acl_dir"])
    _mkdirs(acl_dir)
    subprocess.run([b"setfacl", b"-m", b"u:1234:rwx", b"-d", b"-m", b"u:1234:rx,g::rwx",
                    acl_dir], check=True)
    _write(P(EVERY_TYPE["acl_dir_child"]), b"inherited acl\n")  # gets the default ACL

    # --- owners -----------------------------------------------------------------------
    o = P(EVERY_TYPE["owner"])
    _write(o, b"owned by 1234:5678\n")
    os.chown(o, 1234, 5678)
    os.symlink(b"odd", P(EVERY_TYPE["owner_symlink"]))
    os.chown(P(EVERY_TYPE["owner_symlink"]), 4242, 4343, follow_symlinks=False)
    os.chown(P(b"owners"), 65534, 65534)
    os.chown(P(EVERY_TYPE["fifo"]), 1, 2)
    # setuid after chown (chown clears it); a setuid file owned by someone else.
    su = P(b"modes/setuid-other")
    _write(su, b"x\n")
    os.chown(su, 1234, 5678)
    os.chmod(su, 0o6755)

    # --- a deep chain -------------------------------------------------------------------
    deep = P(EVERY_TYPE["deep"])
    _mkdirs(os.path.dirname(deep))
    _write(deep, b"at the bottom\n")

    os.setxattr(r, b"user.on-the-root", b"root")
    os.chmod(r, 0o751)

    # Modes that block writing go on last (the tree is built as root anyway).
    os.chmod(P(EVERY_TYPE["ro_dir"]), 0o555)

    # --- nanosecond times on everything, children before parents -----------------------
    _set_times(r, rng)
    return root


def sparse_pattern(offset: int, n: int) -> bytes:
    """Recognisable non-zero bytes for a sparse file's data region at offset."""
    tag = b"<data at %d>" % offset
    return (tag * (n // len(tag) + 1))[:n]


def _make_socket(directory: bytes, name: bytes) -> None:
    """Bind a unix socket at directory/name (through /proc/self/fd: paths can be long)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(b"/proc/self/fd/%d/%s" % (dfd, name))
        finally:
            s.close()
    finally:
        os.close(dfd)


def _set_times(root: bytes, rng: random.Random) -> None:
    entries: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            entries.append(os.path.join(dirpath, n))
    # Deepest first, so a directory's mtime is set after everything inside it.
    entries.sort(key=lambda p: p.count(b"/"), reverse=True)
    base = 1_600_000_000 * 10**9
    for p in [*entries, root]:
        mtime = base + rng.randrange(10**17)  # any second, any nanosecond
        roll = rng.random()
        if roll < 0.05:
            mtime = rng.randrange(10**9)  # 1970, sub-second
        elif roll < 0.1:
            mtime = -rng.randrange(10**18)  # before 1970 (ext4 keeps these)
        atime = base + rng.randrange(10**17)
        os.utime(p, ns=(atime, mtime), follow_symlinks=False)


def tree_mtimes_ns(root: Path) -> dict[bytes, int]:
    """{relative path: st_mtime_ns} of every entry under root, the root as b"."."""
    r = os.fsencode(root)
    out = {b".": os.lstat(r).st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(r):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, r)] = os.lstat(p).st_mtime_ns
    return out


def many_files_content(d: int, i: int) -> bytes:
    """The content of file i of directory d in build_many_files_image (distinct, tiny)."""
    return b"file %d of directory %d\n" % (i, d)


def build_many_files_image(path: Path, ndirs: int = 1000, files_per_dir: int = 500,
                           level: int = 3, name: str = "many") -> None:
    """Write an index of ndirs directories /dNNNN with files_per_dir files fNNNNN each
    straight through the writer API (no files on disk): what imagefs.image.capture does
    after its walk.  500 000 files take ~20 s here."""
    from imagefs.format import layout as F
    from imagefs.format.records import Inode
    from imagefs.format.writer import PendingInode as Node
    from imagefs.format.writer import Transaction, add_index, history_entry
    from imagefs.image import open_for_writing

    t = 1_700_000_000_123_456_789
    with open_for_writing(str(path)) as f, Transaction(f, level) as tx:
        packs = tx.pack_writer()
        dirs = []
        for d in range(ndirs):
            kids = []
            for i in range(files_per_dir):
                data = many_files_content(d, i)
                ino = Inode(F.REG, stat.S_IFREG | 0o644, 0, 0, 1, len(data), 0, t + i, t, t)
                kids.append((b"f%05d" % i, Node(ino, locs=[(0, packs.add_chunk(data))])))
            dino = Inode(F.DIR, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, t + d, t, t)
            dirs.append((b"d%04d" % d, Node(dino, children=kids)))
        root = Node(Inode(F.DIR, stat.S_IFDIR | 0o755, 0, 0, 2, 0, 0, t, t, t),
                    children=dirs)
        stats = tx.write_tree(root)
        add_index(tx.commit, name, f"{ndirs} x {files_per_dir} generated files", stats,
                  history_entry("generate"))
        tx.publish()
