"""Read-only FUSE mounts, for real: exactness against the source tree (rsync, stat, xattrs,
holes), real tools in the mount (chroot + dpkg, find, grep), many readers at once, damage,
handler failures, memory on 500 000 files, signals, busy unmounts, and every bad input.

Every mount is made through conftest.mounted(), which unmounts in its teardown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import (
    assert_same_tree,
    data_regions,
    fixture_tree,
    is_mounted,
    mounted,
    pid_alive,
    run_imagefs,
    unmount_hard,
    wait_until,
)
from treegen import EVERY_TYPE

from imagefs import Image
from imagefs.format import layout as F

SPARSE = (EVERY_TYPE["big_sparse"],)


def capture(src: Path, image: Path, name: str = "idx") -> Path:
    run_imagefs("capture", src, image, "--name", name)
    return image


def lstat_all(root: Path) -> dict[bytes, os.stat_result]:
    out = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, base)] = os.lstat(p)
    return out


def assert_exact(src: Path, mnt: Path, sparse: tuple[bytes, ...] = ()) -> None:
    """Requirement 1: rsync finds nothing; stat, hardlinks, links, xattrs, holes match."""
    assert_same_tree(src, mnt, sparse_files=sparse)
    a, b = lstat_all(src), lstat_all(mnt)
    assert sorted(a) == sorted(b)
    by_src_ino: dict[int, set[int]] = defaultdict(set)
    for rel, sa in a.items():
        sb = b[rel]
        fields = ("st_mode", "st_uid", "st_gid", "st_nlink", "st_rdev", "st_mtime_ns")
        for f in fields:
            assert getattr(sa, f) == getattr(sb, f), (rel, f, getattr(sa, f), getattr(sb, f))
        if not stat.S_ISDIR(sa.st_mode):
            # A directory's size is its filesystem's bookkeeping (ext4 blocks, tmpfs
            # entry counts); for everything else the size is data and must match.
            assert sa.st_size == sb.st_size, (rel, sa.st_size, sb.st_size)
        p_src, p_mnt = os.path.join(os.fsencode(src), rel), os.path.join(os.fsencode(mnt), rel)
        if stat.S_ISREG(sa.st_mode):
            by_src_ino[sa.st_ino].add(sb.st_ino)
            # st_blocks is the data's blocks; ext4 also counts an xattr block in it.
            if os.listxattr(os.path.join(os.fsencode(src), rel), follow_symlinks=False):
                assert sb.st_blocks <= sa.st_blocks, (rel, sa.st_blocks, sb.st_blocks)
            else:
                assert sa.st_blocks == sb.st_blocks, (rel, sa.st_blocks, sb.st_blocks)
            if sa.st_size < (64 << 20) or rel in sparse:
                assert data_regions(p_src) == data_regions(p_mnt), (rel, "holes")
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(p_src) == os.readlink(p_mnt)
        names = sorted(os.listxattr(p_src, follow_symlinks=False))
        assert sorted(os.listxattr(p_mnt, follow_symlinks=False)) == names, rel
        for n in names:
            assert os.getxattr(p_src, n, follow_symlinks=False) == \
                os.getxattr(p_mnt, n, follow_symlinks=False), (rel, n)
    for src_ino, mnt_inos in by_src_ino.items():
        assert len(mnt_inos) == 1, f"hardlinks of source inode {src_ino} differ: {mnt_inos}"


def test_every_type_tree_is_served_exactly(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs", "every")
    with mounted(image, "every", tmp_path / "mnt"):
        assert_exact(every_type_tree, tmp_path / "mnt", SPARSE)
        mnt = os.fsencode(tmp_path / "mnt")
        assert os.getxattr(mnt + b"/" + EVERY_TYPE["capability"], "security.capability")
        assert os.getxattr(mnt + b"/" + EVERY_TYPE["acl_dir"], "system.posix_acl_default")


def test_fixture_slice_is_served_exactly(minbase_slice: Path, tmp_path: Path) -> None:
    image = capture(minbase_slice, tmp_path / "s.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        assert_exact(minbase_slice, mnt)
        assert rec["mode"] == "ro"
        with pytest.raises(OSError) as e:
            (mnt / "etc" / "new-file").write_text("x")
        assert e.value.errno == errno.EROFS


def test_missing_names_and_kinds(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt, "-o", "cache=8M,noatime", "-o", "nodev"):
        line = next(x for x in Path("/proc/self/mountinfo").read_text().splitlines()
                    if f" {mnt} " in x)
        assert "nodev" in line.split()[5], line  # the admin's -o wins over the default
        assert (mnt / os.fsdecode(EVERY_TYPE["random3m"])).read_bytes() == (
            every_type_tree / os.fsdecode(EVERY_TYPE["random3m"])).read_bytes()
        for _ in range(2):  # the second answer comes from the kernel's negative cache
            assert not (mnt / "no-such-file").exists()
        with pytest.raises(NotADirectoryError):
            os.listdir(mnt / os.fsdecode(EVERY_TYPE["small_sparse"]))
        with pytest.raises(OSError) as e:
            os.getxattr(mnt / os.fsdecode(EVERY_TYPE["small_sparse"]), "user.nothing")
        assert e.value.errno == errno.ENODATA
        fd = os.open(mnt / os.fsdecode(EVERY_TYPE["small_sparse"]), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.lseek(fd, 10 << 20, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        st = os.statvfs(mnt)
        assert st.f_files > 0 and st.f_blocks > 0 and st.f_namemax == 255


# --- real use ------------------------------------------------------------------------------

def test_chroot_find_grep(minbase_image: Path, tmp_path: Path) -> None:
    """On a read-only mount of the session's capture of bookworm-minbase (conftest)."""
    src, image = fixture_tree("bookworm-minbase"), minbase_image
    mnt = tmp_path / "mnt"
    with mounted(image, "minbase", mnt):
        def dpkg_count(root: Path) -> str:
            out = subprocess.run(["chroot", root, "/bin/sh", "-c", "dpkg -l | wc -l"],
                                 capture_output=True, text=True, check=True)
            return out.stdout.strip()

        count = dpkg_count(mnt)
        assert int(count) > 50
        assert count == dpkg_count(src)

        def find_count(root: Path) -> int:
            out = subprocess.run(f"find {root} -xdev | wc -l", shell=True,
                                 capture_output=True, text=True, check=True)
            return int(out.stdout)

        assert find_count(mnt) == find_count(src)
        grep = subprocess.run(["grep", "-rl", "Debian", f"{mnt}/usr/share/doc"],
                              capture_output=True, text=True)
        assert grep.returncode == 0, grep.stderr
        grep_src = subprocess.run(["grep", "-rl", "Debian", f"{src}/usr/share/doc"],
                                  capture_output=True, text=True)
        rel = sorted(p.removeprefix(str(mnt)) for p in grep.stdout.split())
        assert rel == sorted(p.removeprefix(str(src)) for p in grep_src.stdout.split())


def mount_log(rec: dict) -> str:
    try:
        return Path(rec["log"]).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def test_eight_tar_readers_single_flight(minbase_slice: Path, tmp_path: Path) -> None:
    image = capture(minbase_slice, tmp_path / "s.imagefs")
    with Image.open(str(image)) as img:
        view = img.view(1)
        packs = {e[1] for _p, ino in view.walk() if ino.kind == F.REG for e in ino.extents}
    tar = ["tar", "--sort=name", "--numeric-owner", "-cf", "-", "."]
    expected = hashlib.sha256(subprocess.run(tar, cwd=minbase_slice, capture_output=True,
                                             check=True).stdout).hexdigest()
    mnt = tmp_path / "mnt"
    digests: list[str] = []
    # a cache that holds every pack: what is checked is single flight, not eviction
    with mounted(image, 1, mnt, "-o", "cache=256M") as rec:
        def reader() -> None:
            out = subprocess.run(tar, cwd=mnt, capture_output=True, check=True).stdout
            digests.append(hashlib.sha256(out).hexdigest())

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert digests == [expected] * 8
    m = re.search(r"\((\d+) pack decompressions\)", mount_log(rec))
    assert m, mount_log(rec)
    assert int(m.group(1)) == len(packs), "each pack decompressed exactly once"


# --- damage and failures -------------------------------------------------------------------

def test_damaged_chunk_gives_eio_and_a_log_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = __import__("random").Random(7)
    for name in ("a.bin", "b.bin", "c.bin"):
        (src / name).write_bytes(rng.randbytes(3 << 20))
    (src / "small.txt").write_text("hello\n")
    image = capture(src, tmp_path / "d.imagefs")
    with Image.open(str(image)) as img:
        view = img.view(1)
        packs_of = {n: {e[1] for e in view.lookup(n).extents}
                    for n in ("a.bin", "b.bin", "c.bin", "small.txt")}
    victim = sorted(packs_of["b.bin"] - packs_of["a.bin"] - packs_of["c.bin"])[0]
    with open(image, "r+b") as fh:  # flip one byte inside that pack's payload
        fh.seek(victim + F.FRAME_HEADER + 100)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        with pytest.raises(OSError) as e:
            (mnt / "b.bin").read_bytes()
        assert e.value.errno == errno.EIO
        for name in ("a.bin", "c.bin"):
            if not packs_of[name] & {victim}:
                assert (mnt / name).read_bytes() == (src / name).read_bytes()
        assert (mnt / "small.txt").read_text() == "hello\n" or victim in packs_of["small.txt"]
        assert wait_until(lambda: "b.bin" in mount_log(rec), 10), mount_log(rec)
        line = next(x for x in mount_log(rec).splitlines() if "b.bin" in x)
        assert str(image) in line and "index 1" in line and "chunk" in line, line
        assert "EIO" in line
        assert is_mounted(mnt) and os.listdir(mnt)


def test_unexpected_handler_error_is_eio_not_a_dead_mount(every_type_tree: Path,
                                                          tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt, env={"IMAGEFS_TEST_FAULT": "boom"}) as rec:
        for _ in range(3):
            with pytest.raises(OSError) as e:
                os.stat(mnt / "boom")
            assert e.value.errno == errno.EIO
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(every_type_tree))
        assert "unexpected error in lookup" in mount_log(rec)


# --- memory --------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_memory_while_walking_500k_files(many_files_image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(many_files_image, "many", mnt) as rec:
        pid = rec["pid"]
        peak = rss_mb(pid)
        find = subprocess.Popen(f"find {mnt} -ls | wc -l", shell=True,
                                stdout=subprocess.PIPE, text=True)
        while find.poll() is None:
            peak = max(peak, rss_mb(pid))
            time.sleep(0.05)
        lines = int(find.stdout.read())  # type: ignore[union-attr]
        peak = max(peak, rss_mb(pid))
    assert lines == 1 + 1000 + 500_000
    print(f"peak RSS of the mount process during find -ls: {peak:.1f} MB")
    assert peak < 150, f"mount process RSS peaked at {peak:.1f} MB"


# --- lifecycle -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signals_unmount(sig: int, every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt)  # busy: still must go
        try:
            os.kill(rec["pid"], sig)
            assert wait_until(lambda: not pid_alive(rec["pid"]), 15)
            # SIGKILL: the mount process's guardian detaches the mount after it died
            assert wait_until(lambda: not is_mounted(mnt), 5)
        finally:
            holder.kill()
            holder.wait()
        assert listed_mounts(tmp_path) == []


def test_a_dead_mount_is_replaced(every_type_tree: Path, tmp_path: Path) -> None:
    """With its process and its guardian both killed, a mount is left dead (ENOTCONN); a
    new mount at that place detaches it first instead of refusing."""
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        guardians = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                     and (p / "stat").exists() and int((p / "stat").read_bytes().rsplit(
                         b")", 1)[1].split()[1]) == rec["pid"]]
        assert len(guardians) == 1, guardians
        for pid in (guardians[0], rec["pid"]):
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda pid=pid: not pid_alive(pid), 10)
        with pytest.raises(OSError) as dead:
            os.stat(mnt)
        # ENOTCONN; ECONNABORTED when the stat met the connection's abort under way
        assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED) and is_mounted(mnt)
        again = json.loads(run_imagefs("mount", image, "1", mnt, "--json").stdout)
        try:
            assert sorted(os.listdir(mnt)) == sorted(os.listdir(every_type_tree))
        finally:
            unmount_hard(mnt, again["pid"])


def listed_mounts(under: Path) -> list[dict]:
    """`imagefs mounts --json`, only the mounts under this test's directory (a mount made
    outside the test run shows there as "unregistered")."""
    return [m for m in json.loads(run_imagefs("mounts", "--json").stdout)
            if m["mountpoint"].startswith(str(under))]


def test_unmount_busy_names_the_holder(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "files")
        try:
            r = run_imagefs("unmount", mnt, check=False)
            assert r.returncode == 6
            msg = r.stderr.decode()
            assert f"pid {holder.pid}" in msg and "sleep" in msg, msg
            assert is_mounted(mnt)
        finally:
            holder.kill()
            holder.wait()
        r = run_imagefs("unmount", mnt)
        assert b"Unmounted" in r.stdout
        assert not is_mounted(mnt) and not pid_alive(rec["pid"])


def test_mounts_lists_and_forgets(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs", "every")
    mnt = tmp_path / "mnt"
    with mounted(image, "every", mnt) as rec:
        listed = listed_mounts(tmp_path)
        assert len(listed) == 1
        m = listed[0]
        assert m["image"] == str(image) and m["index"] == 1 and m["name"] == "every"
        assert m["mountpoint"] == str(mnt) and m["pid"] == rec["pid"]
        assert m["mode"] == "ro" and m["state"] == "mounted"
        text = run_imagefs("mounts").stdout.decode()
        assert str(mnt) in text and "1 (every)" in text
    assert listed_mounts(tmp_path) == []
    assert str(mnt) not in run_imagefs("mounts").stdout.decode()


def test_foreground_mount_ends_on_ctrl_c(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "imagefs.cli", "mount", str(image), "1",
                             str(mnt), "--foreground"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: is_mounted(mnt), 20)
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(every_type_tree))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert b"Mounted index 1" in out
        assert b"Traceback" not in err
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount_hard(mnt, None)


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_is_one_line_and_a_code(every_type_tree: Path, tmp_path: Path) -> None:
    image = capture(every_type_tree, tmp_path / "t.imagefs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "file").write_text("x")
    junk = tmp_path / "junk.imagefs"
    junk.write_bytes(b"not an image at all" * 300)
    cases = [
        (("mount", tmp_path / "nope.imagefs", "1", mnt), 3, "no such image"),
        (("mount", image, "7", mnt), 3, "no index"),
        (("mount", image, "1", tmp_path / "missing"), 7, "not an existing directory"),
        (("mount", image, "1", tmp_path / "file"), 7, "not an existing directory"),
        (("mount", junk, "1", mnt), 4, "not an imagefs image"),
        (("mount", image, "1", mnt, "-o", "rw"), 2, "read-only"),
        (("mount", image, "1", mnt, "-o", "cache=lots"), 2, "not a size"),
        (("mount", image, "1", mnt, "-o", "cache=10"), 2, "at least"),
        (("mount", image, "1", mnt, "-o", "no_such_fuse_option"), 2, "mount options"),
        (("unmount", mnt), 3, "not an imagefs mount"),
        (("unmount", tmp_path / "missing"), 3, "not an imagefs mount"),
    ]
    for args, code, text in cases:
        r = run_imagefs(*args, check=False)
        err = r.stderr.decode()
        assert r.returncode == code, (args, r.returncode, err)
        assert text in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert not is_mounted(mnt), args
    with mounted(image, 1, mnt):
        r = run_imagefs("mount", image, "1", mnt, check=False)
        assert r.returncode == 7 and "already an imagefs mount" in r.stderr.decode()
    assert not is_mounted(mnt)


def test_root_mount_serves_other_users_with_kernel_permission_checks(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (allow_other for a root mount)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "public.txt").write_text("for everyone\n")
    (src / "secret.txt").write_text("root only\n")
    os.chmod(src / "secret.txt", 0o600)
    (src / "private").mkdir(mode=0o700)
    (src / "private" / "inside.txt").write_text("x")
    os.chmod(src, 0o755)
    image = capture(src, tmp_path / "p.imagefs")
    import tempfile
    mnt = Path(tempfile.mkdtemp(prefix="imagefs-perm-"))  # /tmp/...: reachable by nobody
    os.chmod(mnt, 0o755)
    try:
        with mounted(image, 1, mnt):
            def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                       "--clear-groups", *argv], capture_output=True,
                                      text=True)

            ok = as_nobody("cat", f"{mnt}/public.txt")
            assert ok.returncode == 0 and ok.stdout == "for everyone\n", ok.stderr
            denied = as_nobody("cat", f"{mnt}/secret.txt")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            denied = as_nobody("ls", f"{mnt}/private")
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
            assert (mnt / "secret.txt").read_text() == "root only\n"  # root may
            opts = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                        if f" {mnt} " in line)
            assert "nosuid" not in opts and "nodev" not in opts, opts
    finally:
        os.rmdir(mnt)


def test_wait_ended_returns_once_the_process_ends() -> None:
    """kernel.wait_ended (how a transaction waits for its mount to end): through a pidfd,
    also for a process that is not the caller's child; False while it still runs."""
    from imagefs.mount.kernel import wait_ended

    # Not our child: a shell's, which ends 0.2 s after the shell has printed its pid.
    shell = subprocess.Popen(["sh", "-c", "sleep 0.2 & echo $!; wait"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None
        pid = int(shell.stdout.readline())
        assert not wait_ended(pid, 0.01)
        start = time.monotonic()
        assert wait_ended(pid, 10)
        assert time.monotonic() - start < 5
    finally:
        shell.wait(10)
    assert wait_ended(pid, 0) and wait_ended(0, 0)  # gone, or not a process
