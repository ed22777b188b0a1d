"""Writable mounts (sessions): POSIX behaviour, real tools, commit, crash, concurrency.

The oracle is always a plain directory on which the same operations were done: the mount
must give the same results (errno included) and, after commit and a fresh read-only
mount, rsync must find the two trees equal.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cli_zygote
import pytest
from conftest import (
    is_mounted,
    kill_mount,
    mounted,
    mounted_rw,
    pid_alive,
    rsync_diff,
    run_imagefs,
    wait_until,
)

from imagefs.image import Image
from imagefs.verify import verify

libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
AT_FDCWD = -100


def renameat2(a: Path, b: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def capture(src: Path, image: Path, name: str = "base", *extra: str) -> Path:
    run_imagefs("capture", src, image, "--name", name, "--level", "3", *extra)
    return image


def copy_tree(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
    return dst


def settle_times(root: Path) -> None:
    """Give every path the same explicit times on both sides (automatic times differ),
    children before parents so the parents' stay put; nanoseconds included."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in [*files, *dirs]:
            p = os.path.join(top, name)
            os.utime(p, ns=(1_600_000_000_123_456_789, 1_650_000_000_987_654_321),
                     follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_123_456_789, 1_650_000_000_987_654_321))


def mounts_json() -> list[dict[str, Any]]:
    return json.loads(run_imagefs("mounts", "--json").stdout)


@pytest.fixture
def base_image(tmp_path: Path, minbase_slice: Path) -> tuple[Path, Path]:
    """(image of the minbase slice, a plain copy of the slice to mirror operations on)."""
    image = capture(minbase_slice, tmp_path / "base.imagefs")
    plain = copy_tree(minbase_slice, tmp_path / "plain")
    return image, plain


# --- 1. POSIX operations -----------------------------------------------------------------

def exercise(root: Path) -> list[Any]:
    """Every operation a real tool uses, on root; the outcomes (values or errnos)."""
    out: list[Any] = []

    def attempt(label: str, fn: Callable[[], Any]) -> None:
        try:
            out.append((label, fn()))
        except OSError as e:
            out.append((label, "errno", errno.errorcode.get(e.errno or 0, e.errno)))

    w = root / "work"
    os.mkdir(w, 0o755)
    # create with O_EXCL, O_APPEND, O_TRUNC
    fd = os.open(w / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    attempt("excl twice", lambda: os.open(w / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    fd = os.open(w / "new", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.pwrite(fd, b"XY", 0)  # O_APPEND: pwrite appends too on Linux
    os.close(fd)
    fd = os.open(w / "t", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, os.urandom(1) * 10000)
    os.close(fd)
    fd = os.open(w / "t", os.O_RDWR | os.O_TRUNC)
    os.write(fd, b"short")
    os.pwrite(fd, b"far", 3 << 20)  # a hole between
    os.pwrite(fd, b"mid", 70000)
    attempt("read t", lambda: os.pread(fd, 20, 69990))
    os.close(fd)
    attempt("size t", lambda: os.stat(w / "t").st_size)
    os.truncate(w / "t", 100)
    os.truncate(w / "t", 200_000)
    attempt("tail zero", lambda: (w / "t").read_bytes()[100:] == bytes(199_900))
    # fallocate: extend, punch a hole
    fd = os.open(w / "fa", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"z" * 300_000)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 65536, 131072)
    attempt("fa seek hole", lambda: os.lseek(fd, 0, os.SEEK_HOLE) <= 65536)
    fallocate(fd, 0, 0, 400_000)
    attempt("fa size", lambda: os.fstat(fd).st_size)
    attempt("fa hole", lambda: os.pread(fd, 8, 100_000))
    os.close(fd)
    # writes into a base file: the middle, past the end, then truncating it
    bash = root / "usr/bin/bash"
    fd = os.open(bash, os.O_RDWR)
    os.pwrite(fd, b"PATCHED" * 100, 500_000)
    os.pwrite(fd, b"tail", os.fstat(fd).st_size + 5000)
    attempt("bash mid", lambda: os.pread(fd, 16, 499_996))
    os.close(fd)
    os.truncate(root / "usr/bin/dash", 4096)
    with open(root / "etc/hostname", "a") as fh:
        fh.write("appended\n")
    # renames: over a file, NOREPLACE, EXCHANGE, a directory across parents
    (w / "a").write_bytes(b"A")
    (w / "b").write_bytes(b"B")
    os.rename(w / "a", w / "b")
    (w / "c").write_bytes(b"C")
    attempt("noreplace", lambda: renameat2(w / "c", w / "b", RENAME_NOREPLACE))
    renameat2(w / "c", w / "b", RENAME_EXCHANGE)
    attempt("exchanged", lambda: ((w / "b").read_bytes(), (w / "c").read_bytes()))
    os.rename(root / "usr/share/doc", w / "doc")
    os.makedirs(root / "usr/other/sub")
    attempt("exchange dir", lambda: renameat2(w / "doc", root / "usr/other",
                                              RENAME_EXCHANGE))
    attempt("into itself", lambda: os.rename(w / "doc", w / "doc/sub/x"))
    # links, and an unlinked file that is still open
    os.link(w / "b", w / "b2")
    os.link(root / "etc/passwd", w / "passwd-link")
    attempt("nlink", lambda: os.stat(w / "b").st_nlink)
    fd = os.open(w / "b2", os.O_RDWR)
    os.unlink(w / "b")
    os.unlink(w / "b2")
    attempt("unlinked nlink", lambda: os.fstat(fd).st_nlink)
    os.pwrite(fd, b"still here", 0)
    attempt("unlinked read", lambda: os.pread(fd, 10, 0))
    os.close(fd)
    attempt("gone", lambda: os.stat(w / "b"))
    # symlinks, fifo, device, socket-free mknod
    os.symlink("c", w / "sym")
    os.symlink("/nowhere/" + "x" * 200, w / "dangling")
    attempt("readlink", lambda: os.readlink(w / "sym"))
    os.mkfifo(w / "fifo", 0o600)
    os.mknod(w / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(w / "plain", 0o600 | stat.S_IFREG)
    # metadata: chmod (setuid too), chown, utimens with nanoseconds
    os.chmod(w / "c", 0o4755)
    os.chown(w / "c", 1234, 5678)
    os.chown(root / "etc/hostname", 42, 43)
    os.chmod(root / "usr/bin", 0o711)
    os.utime(w / "c", ns=(1_000_000_001, 2_000_000_002))
    attempt("mtime ns", lambda: os.stat(w / "c").st_mtime_ns)
    # xattrs
    os.setxattr(w / "c", "user.one", b"1")
    os.setxattr(w / "c", "user.two", b"2" * 1000)
    os.setxattr(root / "etc/passwd", "user.base", b"b")
    attempt("xattr create", lambda: os.setxattr(w / "c", "user.one", b"x",
                                                os.XATTR_CREATE))
    attempt("xattr replace", lambda: os.setxattr(w / "c", "user.none", b"x",
                                                 os.XATTR_REPLACE))
    os.removexattr(w / "c", "user.two")
    attempt("xattr remove missing", lambda: os.removexattr(w / "c", "user.two"))
    attempt("xattrs", lambda: sorted(os.listxattr(w / "c")))
    attempt("getxattr", lambda: os.getxattr(w / "c", "user.one"))
    # directories
    os.makedirs(w / "d1/d2/d3")
    attempt("rmdir full", lambda: os.rmdir(w / "d1"))
    attempt("unlink dir", lambda: os.unlink(w / "d1"))
    attempt("rmdir file", lambda: os.rmdir(w / "c"))
    attempt("mkdir exists", lambda: os.mkdir(w / "d1"))
    os.rmdir(w / "d1/d2/d3")
    attempt("nlink dir", lambda: os.stat(w / "d1").st_nlink)
    shutil.rmtree(root / "var/log")
    attempt("long name", lambda: os.open(w / ("n" * 256), os.O_CREAT | os.O_WRONLY))
    # fsync, statfs, locks, mmap
    fd = os.open(w / "c", os.O_RDWR)
    os.fsync(fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    attempt("statvfs", lambda: os.statvfs(w).f_namemax)
    fd = os.open(w / "mm", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8192)
    with mmap.mmap(fd, 8192) as m:
        m[100:105] = b"mmapd"
        m.flush()
    os.close(fd)
    attempt("mmap read", lambda: (w / "mm").read_bytes()[98:107])
    with open(root / "usr/bin/bash", "rb") as fh, \
            mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
        attempt("mmap base", lambda: bytes(m[500_000:500_007]))
    return out


def test_posix_operations_match_a_plain_directory(base_image: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    image, plain = base_image
    expected = exercise(plain)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt) as rec:
        got = exercise(mnt)
        assert got == expected
        settle_times(plain)
        settle_times(mnt)
        assert rsync_diff(plain, mnt) == ""
        run_imagefs("commit", mnt)
        assert rsync_diff(plain, mnt) == "", "the commit changed what the mount shows"
        assert rec["mode"] == "rw"
        run_imagefs("unmount", mnt, "--commit")
        assert not is_mounted(mnt)
    assert run_imagefs("verify", image).returncode == 0
    with mounted(image, 1, mnt):
        assert rsync_diff(plain, mnt) == ""
    assert not list((Path(os.environ["IMAGEFS_STATE_DIR"]) / "sessions").glob(
        rec["session"])), "unmount --commit leaves no session behind"


def test_other_users_permissions(tmp_path: Path) -> None:
    import tempfile

    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    os.chmod(src / "shared", 0o1777)
    (src / "shared" / "roots").write_text("root's\n")
    (src / "readonly.txt").write_text("keep\n")
    os.chmod(src, 0o755)
    image = capture(src, tmp_path / "p.imagefs")
    mnt = Path(tempfile.mkdtemp(prefix="imagefs-rwperm-"))
    os.chmod(mnt, 0o755)

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                               "--clear-groups", *argv], capture_output=True, text=True)
    try:
        with mounted_rw(image, 1, mnt):
            denied = as_nobody("sh", "-c", f"echo x >> {mnt}/readonly.txt")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            denied = as_nobody("touch", f"{mnt}/new")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            ok = as_nobody("sh", "-c", f"echo mine > {mnt}/shared/nobodys")
            assert ok.returncode == 0, ok.stderr
            st = os.stat(mnt / "shared" / "nobodys")
            assert (st.st_uid, st.st_gid) == (65534, 65534)
            sticky = as_nobody("rm", "-f", f"{mnt}/shared/roots")
            assert sticky.returncode != 0, "the sticky bit protects root's file"
            chown = as_nobody("chown", "0", f"{mnt}/shared/nobodys")
            assert chown.returncode != 0 and "not permitted" in chown.stderr
            (mnt / "readonly.txt").write_text("root may\n")
    finally:
        os.rmdir(mnt)


# --- 2. real tools -------------------------------------------------------------------------

def test_tar_git_sqlite_in_a_mount(base_image: tuple[Path, Path], tmp_path: Path,
                                   minbase_slice: Path) -> None:
    image, plain = base_image
    tarball = tmp_path / "slice.tar"
    subprocess.run(["tar", "--xattrs", "--acls", "-cf", tarball, "-C", minbase_slice,
                    "usr/share/doc", "etc"], check=True)
    mnt = tmp_path / "mnt"

    def work(root: Path) -> str:
        (root / "x").mkdir()
        subprocess.run(["tar", "--xattrs", "--acls", "-xpf", tarball, "-C", root / "x"],
                       check=True)
        repo = root / "repo"
        env = {**os.environ, "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
               "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z", "HOME": str(tmp_path)}
        # One delta thread: with more, the pack's bytes (and name) depend on timing.
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@e",
               "-c", "pack.threads=1"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
        shutil.copytree(minbase_slice / "etc", repo / "etc", symlinks=True)
        for i in range(3):
            (repo / f"f{i}").write_text(f"{i}\n" * 1000)
            subprocess.run([*git, "add", "-A"], check=True, env=env)
            subprocess.run([*git, "commit", "-qm", f"c{i}"], check=True, env=env)
        subprocess.run([*git, "gc", "-q"], check=True, env=env)
        fsck = subprocess.run([*git, "fsck", "--strict"], capture_output=True, text=True,
                              env=env)
        assert fsck.returncode == 0, fsck.stderr
        db = root / "db.sqlite"
        script = "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT);\nBEGIN;\n" + "".join(
            f"INSERT INTO t(b) VALUES ('{'v' * (i % 300)}');\n" for i in range(20000)) + \
            "COMMIT;\nDELETE FROM t WHERE a % 3 = 0;\nVACUUM;\nPRAGMA integrity_check;\n" \
            "SELECT count(*) FROM t;\n"
        out = subprocess.run(["sqlite3", str(db)], input=script, capture_output=True,
                             text=True, check=True).stdout
        assert out.split() == ["ok", "13334"], out
        return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                              env=env).stdout

    head = work(plain)
    with mounted_rw(image, 1, mnt):
        assert work(mnt) == head
        run_imagefs("unmount", mnt, "--commit")
    with mounted(image, 1, mnt):
        # Content and metadata but times (written by the tools themselves), and git's
        # index, which records each file's inode number, device and ctime.
        assert rsync_diff(plain, mnt, extra=["--omit-dir-times", "--no-times",
                                             "--exclude=/repo/.git/index"]) == ""


def hello_deb(tmp_path: Path) -> Path:
    """../shared/fixtures/debs/hello_*.deb, else fetched with apt-get download."""
    for base in (os.environ.get("IMAGEFS_FIXTURES"),
                 str(Path(__file__).resolve().parents[2] / "shared" / "fixtures")):
        if base:
            found = sorted(Path(base, "debs").glob("hello_*.deb"))
            if found:
                return found[0]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagefs" / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("hello_*.deb"))
    if not found:
        got = subprocess.run(["apt-get", "download", "hello"], cwd=cache, capture_output=True,
                             text=True)
        found = sorted(cache.glob("hello_*.deb"))
        if not found:
            pytest.skip(f"no hello .deb and apt-get download failed: {got.stderr.strip()}")
    return found[0]


def test_dpkg_installs_into_a_mounted_fixture(tmp_path: Path, fixture_tree: Any) -> None:
    src = fixture_tree("bookworm-minbase")
    image = capture(src, tmp_path / "fx.imagefs", "minbase")
    deb = hello_deb(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        subprocess.run(["dpkg", f"--root={mnt}", "--force-script-chrootless",
                        "--force-not-root", "-i", str(deb)], check=True, capture_output=True)
        q = subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W", "hello"],
                           capture_output=True, text=True, check=True)
        assert q.stdout.startswith("hello\t2.10"), q.stdout
        run_imagefs("commit", mnt)
        run_imagefs("unmount", mnt, "--commit")
    assert run_imagefs("verify", image).returncode == 0
    with mounted(image, 1, mnt):
        q = subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W", "hello"],
                           capture_output=True, text=True, check=True)
        assert q.stdout.startswith("hello\t2.10")
        assert (mnt / "usr/bin/hello").stat().st_size > 0
        run = subprocess.run(["chroot", str(mnt), "/usr/bin/hello"], capture_output=True,
                             text=True)
        assert run.stdout == "Hello, world!\n", run.stderr


def test_cp_and_rsync_of_trees_into_a_mount(tmp_path: Path, every_type_tree: Path,
                                            minbase_slice: Path) -> None:
    # Every kind of inode and metadata, but the 5 GiB sparse file (reading its zeros
    # through both sides' rsync -c costs a minute; test_mount serves it exactly).
    kinds = copy_tree(every_type_tree, tmp_path / "kinds")
    (kinds / "sparse/big-5GiB.img").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    image = capture(empty, tmp_path / "e.imagefs", "empty")
    plain = tmp_path / "plain"
    plain.mkdir()
    mnt = tmp_path / "mnt"

    def fill(root: Path) -> None:
        subprocess.run(["cp", "-a", f"{kinds}/.", str(root / "cp")], check=True)
        subprocess.run(["rsync", "-aHAX", f"{minbase_slice}/", str(root / "rsync")],
                       check=True)
        os.utime(root, ns=(1, 2))  # filling it changed the root's times

    fill(plain)
    with mounted_rw(image, 1, mnt):
        fill(mnt)
        assert rsync_diff(kinds, mnt / "cp") == ""
        assert rsync_diff(minbase_slice, mnt / "rsync") == ""
        run_imagefs("unmount", mnt, "--commit")
    with mounted(image, 1, mnt):
        assert rsync_diff(plain, mnt) == ""


# --- 4, 5. copy-on-write per chunk; commit costs what changed --------------------------------

def test_writing_4k_into_a_1g_file_copies_one_chunk(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as fh:  # semi-compressible: a 1 MiB random block repeated
        block = os.urandom(1 << 20)
        for i in range(1024):
            fh.write(block[i:] + block[:i])
    image = capture(src, tmp_path / "big.imagefs", "big", "--level", "1")
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt) as rec:
        state = Path(os.environ["IMAGEFS_STATE_DIR"]) / "sessions" / rec["session"]
        before = _du(state)
        fd = os.open(mnt / "big", os.O_RDWR)
        os.pwrite(fd, b"\xab" * 4096, 512 << 20)
        os.fsync(fd)
        os.close(fd)
        grown = _du(state) - before
        assert grown <= 1 << 20, f"staging grew {grown} bytes for a 4 KiB write"
        size0 = image.stat().st_size
        t0 = time.monotonic()
        run_imagefs("commit", mnt)
        took = time.monotonic() - t0
        grew = image.stat().st_size - size0
        assert grew <= 1 << 20, f"the commit grew the image by {grew} bytes"
        print(f"4 KiB into 1 GiB: staging +{grown} B, image +{grew} B, commit {took:.2f} s")
        with open(mnt / "big", "rb") as fh:
            fh.seek((512 << 20) - 10)
            assert fh.read(4116) == (block[511:] + block[:511])[(1 << 20) - 10:] \
                + b"\xab" * 4096 + (block[512:] + block[:512])[4096:4106]
        run_imagefs("unmount", mnt, "--discard")
    assert run_imagefs("verify", image).returncode == 0


def test_large_writes_written_behind_read_back_exactly(base_image: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """Writes of 64 KiB and more are answered before a worker thread writes them (O_DIRECT
    when aligned): every later request sees them, and so do commit and a fresh mount."""
    image, plain = base_image
    mnt = tmp_path / "mnt"
    bash = bytearray((plain / "usr/bin/bash").read_bytes())
    big = bytearray()

    def put(buf: bytearray, data: bytes, at: int) -> None:
        if len(buf) < at + len(data):
            buf.extend(bytes(at + len(data) - len(buf)))
        buf[at:at + len(data)] = data

    with mounted_rw(image, 1, mnt):
        fd = os.open(mnt / "big", os.O_RDWR | os.O_CREAT, 0o644)
        for i in range(8):  # aligned: O_DIRECT
            block = os.urandom(1 << 20)
            assert os.write(fd, block) == len(block)
            put(big, block, i << 20)
        for data, at in ((os.urandom(200_000), 3_000_001), (os.urandom(1 << 20), 10 << 20),
                         (os.urandom(65_536), 4096), (os.urandom(70_000), 12 << 20)):
            assert os.pwrite(fd, data, at) == len(data)
            put(big, data, at)
            assert os.pread(fd, len(data) + 10, at) == bytes(big[at:at + len(data) + 10])
        assert os.fstat(fd).st_size == len(big)
        os.ftruncate(fd, 5_000_000)
        del big[5_000_000:]
        block = os.urandom(256 << 10)
        os.pwrite(fd, block, 6 << 20)  # behind, past a hole
        put(big, block, 6 << 20)
        os.close(fd)
        with open(mnt / "usr/bin/bash", "r+b") as fh:  # a base file: copy-up, then behind
            for data, at in ((os.urandom(128 << 10), 3 << 12), (os.urandom(100_000), 555_555)):
                fh.seek(at)
                fh.write(data)
                fh.flush()
                put(bash, data, at)
        assert (mnt / "big").read_bytes() == big
        with open(mnt / "big", "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[:] == big
        assert (mnt / "usr/bin/bash").read_bytes() == bash
        run_imagefs("unmount", mnt, "--commit")
    with mounted(image, 1, mnt):
        assert (mnt / "big").read_bytes() == big
        assert (mnt / "usr/bin/bash").read_bytes() == bash
    assert run_imagefs("verify", image).returncode == 0


def _du(path: Path) -> int:
    return sum(os.lstat(os.path.join(t, f)).st_blocks * 512
               for t, _d, fs in os.walk(path) for f in fs)


def test_commit_writes_only_the_changed_file_and_its_directories(
        tmp_path: Path, fixture_tree: Any) -> None:
    src = fixture_tree("bookworm-minbase")
    image = capture(src, tmp_path / "fx.imagefs", "minbase")
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        target = mnt / "usr/share/doc/dpkg/copyright"
        data = target.read_bytes()
        target.write_bytes(data + b"changed\n")
        size0 = image.stat().st_size
        out = json.loads(run_imagefs("commit", mnt, "--json").stdout)
        grew = image.stat().st_size - size0
        # the file and its path: copyright, dpkg/, doc/, share/, usr/, /
        assert out["records"] == 6, out
        assert grew < len(data) + 64 * 1024, f"the image grew by {grew} bytes"
        assert (mnt / "usr/share/doc/dpkg/copyright").read_bytes() == data + b"changed\n"
        run_imagefs("unmount", mnt, "--discard")
    with mounted(image, 1, mnt):
        assert (mnt / "usr/share/doc/dpkg/copyright").read_bytes() == data + b"changed\n"
        assert rsync_diff(src, mnt, extra=["--exclude=/usr/share/doc/dpkg/copyright"]) == ""


# --- 6. crash-safe staging ------------------------------------------------------------------

def test_killed_mount_leaves_a_stale_session_that_remounts(base_image: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    image, _plain = base_image
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt) as rec:
        (mnt / "kept").write_bytes(b"fsynced\n" * 1000)
        fd = os.open(mnt / "kept", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        with open(mnt / "usr/bin/bash", "r+b") as fh:
            fh.seek(123_456)
            fh.write(b"CHANGED")
            fh.flush()
            os.fsync(fh.fileno())
        os.mkdir(mnt / "newdir")
        os.rename(mnt / "etc/passwd", mnt / "newdir/passwd")
        dfd = os.open(mnt / "newdir", os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        kill_mount(rec)
        sessions = [m for m in mounts_json() if m.get("session") == rec["session"]]
        assert [m["state"] for m in sessions] == ["stale"], sessions
        assert sessions[0]["staged_bytes"] > 0
        remount = json.loads(run_imagefs("remount", mnt, "--json").stdout)
        assert remount["session"] == rec["session"]
        try:
            assert (mnt / "kept").read_bytes() == b"fsynced\n" * 1000
            with open(mnt / "usr/bin/bash", "rb") as fh:
                fh.seek(123_450)
                assert fh.read(13)[6:] == b"CHANGED"
            assert (mnt / "newdir/passwd").exists() and not (mnt / "etc/passwd").exists()
            live = [m for m in mounts_json() if m.get("session") == rec["session"]]
            assert [m["state"] for m in live] == ["live"]
            kill_mount(remount)
        finally:
            if is_mounted(mnt):
                kill_mount(remount)
    out = run_imagefs("cleanup", "--all", "--json")
    assert rec["session"] in {s["session"] for s in json.loads(out.stdout)}
    assert not [m for m in mounts_json() if m.get("session") == rec["session"]]
    assert run_imagefs("verify", image).returncode == 0


# --- 7. atomic commit ------------------------------------------------------------------------

CRASH_POINTS = ["after-packs", "after-metadata", "before-commit-frame", "before-fsync",
                "before-slot", "after-slot", "after-publish"]


def _stale_session(image: Path, mnt: Path, change: Callable[[Path], None]) -> str:
    with mounted_rw(image, 1, mnt) as rec:
        change(mnt)
        fd = os.open(mnt, os.O_RDONLY)
        os.fsync(fd)  # makes the whole staging durable
        os.close(fd)
        kill_mount(rec)
    return str(rec["session"])


def _index_digest(image: Path) -> str:
    doc = json.loads(run_imagefs("info", image, "--json").stdout)
    return str(doc["indices"][0]["digest"])


@pytest.mark.parametrize("kills", [pytest.param(56, id="56-kills"),
                                   pytest.param(1000, id="1000-kills",
                                                marks=pytest.mark.slow)])
def test_commit_killed_anywhere_leaves_old_or_new(tmp_path: Path, minbase_slice: Path,
                                                  kills: int) -> None:
    """Kill the committing process at every named point and at random moments: each time
    verify is clean and the index is wholly the old state or wholly the new."""
    import random

    image = capture(minbase_slice, tmp_path / "a.imagefs")
    mnt = tmp_path / "mnt"

    def change(root: Path) -> None:
        for i in range(40):
            (root / f"etc/new{i}").write_bytes(os.urandom(5000) * 20)
        with open(root / "usr/bin/bash", "r+b") as fh:
            fh.seek(200_000)
            fh.write(os.urandom(300_000))
        shutil.rmtree(root / "usr/share/doc")

    session = _stale_session(image, mnt, change)
    state = Path(os.environ["IMAGEFS_STATE_DIR"]) / "sessions" / session
    old = _index_digest(image)
    pristine_image = tmp_path / "pristine.imagefs"
    pristine_state = tmp_path / "pristine-state"
    shutil.copy2(image, pristine_image)
    shutil.copytree(state, pristine_state)

    def restore() -> None:
        shutil.copy2(pristine_image, image)
        shutil.rmtree(state)
        shutil.copytree(pristine_state, state)

    t0 = time.monotonic()
    run_imagefs("commit", session)
    full = time.monotonic() - t0
    new = _index_digest(image)
    assert new != old
    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    for i in range(kills):
        restore()
        point = CRASH_POINTS[i] if i < len(CRASH_POINTS) else None
        env = {**os.environ, "IMAGEFS_TEST_CRASH_AT": point} if point else None
        proc = cli_zygote.popen(["commit", session], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if point is None:
            time.sleep(rng.uniform(0.05, full))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        report = verify(str(image))
        assert not report.problems, f"kill {i} ({point}): {report.problems}"
        with Image.open(str(image)) as img:
            digest = img.indices[0].digest
        assert digest in (old, new), f"kill {i} ({point}) left a third state"
        outcomes["new" if digest == new else "old"] += 1
        if i % 8 == 0:  # the session survives: committing again finishes the job
            run_imagefs("commit", session)
            assert _index_digest(image) == new
    print(f"{kills} kills: {outcomes}")
    assert outcomes["old"] and outcomes["new"]
    restore()
    run_imagefs("cleanup", session)


# --- 8. concurrency -----------------------------------------------------------------------

def test_sessions_on_two_indices_and_a_reader(tmp_path: Path, minbase_slice: Path) -> None:
    image = capture(minbase_slice, tmp_path / "two.imagefs", "one")
    run_imagefs("capture", minbase_slice, image, "--name", "two", "--level", "3")
    m1, m2, ro, m3 = (tmp_path / n for n in ("m1", "m2", "ro", "m3"))
    bash = (minbase_slice / "usr/bin/bash").read_bytes()
    with mounted(image, 1, ro), mounted_rw(image, 1, m1), mounted_rw(image, 2, m2):
        (m1 / "one.txt").write_text("one\n")
        (m2 / "two.txt").write_text("two\n")
        with open(ro / "usr/bin/bash", "rb") as reader:
            first = reader.read(len(bash) // 2)
            run_imagefs("commit", m1)
            run_imagefs("commit", m2)
            assert first + reader.read() == bash
        assert not (ro / "one.txt").exists()  # the read-only mount keeps its state
        with mounted_rw(image, 1, m3):
            (m3 / "three.txt").write_text("3\n")
            (m1 / "again.txt").write_text("again\n")
            run_imagefs("commit", m1)
            refused = run_imagefs("commit", m3, check=False)
            assert refused.returncode == 6
            assert b"committed from elsewhere" in refused.stderr
            assert b"--new-index" in refused.stderr
            run_imagefs("commit", m3, "--new-index", "three")
            run_imagefs("unmount", m3, "--discard")
        run_imagefs("unmount", m1, "--commit")
        run_imagefs("unmount", m2, "--commit")
    assert run_imagefs("verify", image).returncode == 0
    names = {e["name"]: e for e in json.loads(run_imagefs("info", image, "--json").stdout)[
        "indices"]}
    assert set(names) == {"one", "two", "three"}
    for spec, present, absent in (("one", ["one.txt", "again.txt"], ["three.txt"]),
                                  ("two", ["two.txt"], ["one.txt"]),
                                  ("three", ["one.txt", "three.txt"], ["again.txt"])):
        listing = run_imagefs("ls", image, spec, "/").stdout.split()
        for p in present:
            assert p.encode() in listing, (spec, p)
        for p in absent:
            assert p.encode() not in listing, (spec, p)


# --- 9. full disks -------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    """Mount a 24 MiB tmpfs (made by this test, unmounted in teardown)."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_staging_gives_enospc_and_loses_nothing(tmp_path: Path, small_tmpfs: Path,
                                                    minbase_slice: Path) -> None:
    image = capture(minbase_slice, tmp_path / "s.imagefs")
    mnt = tmp_path / "mnt"
    env = {"IMAGEFS_STATE_DIR": str(small_tmpfs / "state")}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with mounted_rw(image, 1, mnt):
            (mnt / "small").write_bytes(b"kept\n")
            dd = subprocess.run(["dd", "if=/dev/urandom", f"of={mnt}/huge", "bs=1M",
                                 "count=64", "conv=fsync"], capture_output=True, text=True)
            assert dd.returncode != 0 and "No space left" in dd.stderr, dd.stderr
            assert (mnt / "small").read_bytes() == b"kept\n"
            os.unlink(mnt / "huge")
            (mnt / "after").write_bytes(b"after\n")
            run_imagefs("unmount", mnt, "--commit")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert run_imagefs("cat", image, "1", "/after").stdout == b"after\n"
    assert run_imagefs("verify", image).returncode == 0


def test_written_back_onto_a_full_disk_fails_the_close(tmp_path: Path, small_tmpfs: Path,
                                                      minbase_slice: Path) -> None:
    """With the writeback cache, write() only fills the kernel's pages; a page that cannot
    be written back (the staging disk is full) fails the writer's close (no FLUSH request:
    the kernel writes the pages back itself and reports their error), and the mount goes
    on: what was kept is kept, later writes land, the commit publishes them."""
    image = capture(minbase_slice, tmp_path / "s.imagefs")
    mnt = tmp_path / "mnt"
    saved = dict(os.environ)
    os.environ["IMAGEFS_STATE_DIR"] = str(small_tmpfs / "state")
    try:
        with mounted_rw(image, 1, mnt):
            (mnt / "small").write_bytes(b"kept\n")
            fd = os.open(mnt / "huge", os.O_WRONLY | os.O_CREAT, 0o644)
            chunk = os.urandom(1 << 20)
            for _ in range(64):  # 64 MiB onto a 24 MiB disk: the pages take them all
                os.write(fd, chunk)
            with pytest.raises(OSError) as failed:
                os.close(fd)
            assert failed.value.errno == errno.ENOSPC
            os.unlink(mnt / "huge")
            fd = os.open(mnt / "after", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"after\n" * 20_000)
            os.fsync(fd)
            os.close(fd)
            assert (mnt / "small").read_bytes() == b"kept\n"
            run_imagefs("unmount", mnt, "--commit")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert run_imagefs("cat", image, "1", "/after").stdout == b"after\n" * 20_000
    assert run_imagefs("verify", image).returncode == 0


def test_commit_onto_a_full_disk_leaves_image_and_session(tmp_path: Path, small_tmpfs: Path,
                                                          minbase_slice: Path) -> None:
    image = capture(minbase_slice, small_tmpfs / "f.imagefs")
    old = _index_digest(image)
    filler = small_tmpfs / "filler"
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        (mnt / "big").write_bytes(os.urandom(6 << 20))
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        with open(filler, "wb") as fh:
            fh.write(b"\0" * max(free - (1 << 20), 0))
        size = image.stat().st_size
        failed = run_imagefs("commit", mnt, check=False)
        assert failed.returncode == 8 and b"no space left" in failed.stderr.lower(), \
            failed.stderr
        assert image.stat().st_size == size
        assert _index_digest(image) == old
        assert run_imagefs("verify", image).returncode == 0
        assert len((mnt / "big").read_bytes()) == 6 << 20  # the session is intact
        filler.unlink()
        run_imagefs("unmount", mnt, "--commit")
    assert _index_digest(image) != old
    assert run_imagefs("verify", image).returncode == 0


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_to_sessions(base_image: tuple[Path, Path], tmp_path: Path) -> None:
    image, _plain = base_image
    mnt = tmp_path / "mnt"
    sessions = Path(os.environ["IMAGEFS_STATE_DIR"]) / "sessions"
    before = set(os.listdir(sessions)) if sessions.exists() else set()

    def fails(code: int, *args: Any, says: str) -> None:
        proc = run_imagefs(*args, check=False)
        err = proc.stderr.decode()
        assert proc.returncode == code, (args, proc.returncode, err)
        assert len(err.strip().splitlines()) == 1 and says in err, err

    mnt.mkdir()
    fails(3, "mount", "--rw", image, "9", mnt, says="no index")
    fails(3, "mount", "--rw", tmp_path / "none.imagefs", "1", mnt, says="no such image")
    fails(2, "mount", "--rw", image, "1", mnt, "-o", "ro", says="-o ro")
    assert (set(os.listdir(sessions)) if sessions.exists() else set()) == before, \
        "a failed mount left a session behind"
    fails(3, "commit", mnt, says="no such session")
    fails(3, "remount", "deadbeef", says="no such session")
    fails(2, "cleanup", says="--all or one SESSION")
    with mounted_rw(image, 1, mnt) as rec:
        fails(2, "unmount", mnt, says="--commit")
        fails(2, "commit", mnt, "--new-index", "base", says="already exists")
        fails(2, "commit", mnt, "--new-index", "123", says="not all digits")
        fails(6, "remount", mnt, says="unmount it first")
        fails(6, "cleanup", rec["session"], says="unmount it first")
        fails(7, "mount", "--rw", image, "1", mnt, says="already an imagefs mount")
        assert is_mounted(mnt) and pid_alive(rec["pid"])
    with mounted(image, 1, mnt):
        fails(2, "unmount", mnt, "--commit", says="nothing to commit")
    assert wait_until(lambda: not is_mounted(mnt))
