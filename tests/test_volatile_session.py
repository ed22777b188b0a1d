"""Volatile sessions: a servicing transaction's own sessions are never fsynced (a crash
discards them whole), while every other session stays durable."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import copy_image, run_imagefs

from imagefs.mount.registry import record_for
from imagefs.session.content import FileContent
from imagefs.session.lifecycle import find_session
from imagefs.session.staging import JournalStore, SqliteStore, Staging
from servicing.runner import run
from servicing.transaction import opened


@pytest.mark.parametrize("volatile", [False, True])
def test_a_volatile_staging_writes_everything_but_syncs_nothing(tmp_path: Path,
                                                                volatile: bool) -> None:
    """A volatile staging is a journal nothing fsyncs (staging.JournalStore); every other
    one is SQLite, fsynced at a durable sync."""
    staging = Staging(str(tmp_path / "s"), volatile)
    try:
        if volatile:
            assert isinstance(staging.store, JournalStore)
        else:
            assert isinstance(staging.store, SqliteStore)
            (mode,) = staging.store.db.execute("PRAGMA synchronous").fetchone()
            assert mode == 1  # NORMAL; FULL only for the length of a durable sync
        staging.meta_set("base_root", 42)
        staging.sync(durable=True)
    finally:
        staging.close()
    assert (tmp_path / "s" / "staging.db").exists() is not volatile
    assert (tmp_path / "s" / "staging.journal").exists() is volatile
    again = Staging(str(tmp_path / "s"), volatile)
    try:
        meta = again.load_meta()
    finally:
        again.close()
    assert meta["base_root"] == 42  # written all the same
    # 'synced' marks a durable sync; a volatile staging never makes one
    assert ("synced" in meta) is not volatile


@pytest.mark.parametrize("volatile", [False, True])
def test_fsync_in_a_volatile_session_writes_nothing(tmp_path: Path, volatile: bool) -> None:
    """dpkg fsyncs its database a dozen times per package: in a servicing transaction
    those answer at once, and the staging is written at the interval and at the end."""
    staging = Staging(str(tmp_path / "s"), volatile)
    try:
        staging.meta_set("base_root", 42)
        content = FileContent.__new__(FileContent)  # fsync needs nothing but the staging
        content.st = staging
        content.fsync()
        assert staging.pending is volatile
    finally:
        staging.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None,
                    reason="needs root and FUSE")
def test_servicing_sessions_are_volatile_and_others_are_not(minbase_image: Path,
                                                            tmp_path: Path) -> None:
    image = copy_image(minbase_image, tmp_path / "m.imagefs")
    with opened(str(image), "1") as target:
        assert find_session(target.root).volatile
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_imagefs("mount", "--rw", "--no-daemon", image, "1", mnt)
    try:
        assert not find_session(str(mnt)).volatile
    finally:
        run_imagefs("unmount", mnt, "--discard")


def _cpus_of(pid: int) -> set[str]:
    """The CPUs each thread of pid may run on, as /proc says (one entry per thread)."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        found.add(next(ln.split()[1] for ln in status.splitlines()
                       if ln.startswith("Cpus_allowed_list:")))
    return found


def _in_container(root: str) -> str:
    out = run(root, ["sh", "-c", "grep Cpus_allowed_list /proc/self/status"])
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().split()[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None
                    or len(os.sched_getaffinity(0)) < 2, reason="needs root, FUSE, 2 CPUs")
def test_a_transactions_mount_and_its_container_share_one_cpu(minbase_image: Path,
                                                              tmp_path: Path) -> None:
    """mount/cpu.py: each transaction's mount process, every thread of it, is pinned to
    one CPU, a second transaction's to another; the programs run in it run there too,
    and the caller's own CPUs are as they were.  A user's writable session is left alone."""
    before = os.sched_getaffinity(0)
    image = copy_image(minbase_image, tmp_path / "m.imagefs")
    with opened(str(image), "1") as first, opened(str(image), "1") as second:
        pids = [record_for(t.root).pid for t in (first, second)]  # type: ignore[union-attr]
        cpus = [_cpus_of(pid) for pid in pids]
        assert all(len(c) == 1 for c in cpus) and cpus[0] != cpus[1], cpus
        for target, cpu in zip((first, second), cpus, strict=True):
            assert {_in_container(target.root)} == cpu
            assert os.sched_getaffinity(0) == before
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_imagefs("mount", "--rw", "--no-daemon", image, "1", mnt)
    try:
        (everything,) = _cpus_of(record_for(str(mnt)).pid)  # type: ignore[union-attr]
        assert "-" in everything or "," in everything  # not pinned: more than one CPU
        assert _in_container(str(mnt)) == everything
    finally:
        run_imagefs("unmount", mnt, "--discard")


def _getattrs_after(log: str) -> int:
    """The GETATTR requests the mount whose log this is served, from its last line
    (written at unmount; waited for)."""
    deadline = time.monotonic() + 10
    while "unmounted from" not in (text := Path(log).read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    found = re.search(r"requests \d+: ([^;]*)", text.split("unmounted from")[-1])
    assert found, text
    return sum(int(n) for n, op in re.findall(r"(\d+) (\w+)", found.group(1))
               if op == "getattr")


def _reopen_and_fstat(path: str, times: int = 6) -> None:
    for _ in range(times):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fstat(fd)
        finally:
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None,
                    reason="needs root and FUSE")
def test_a_transactions_mount_goes_without_the_writeback_cache(minbase_image: Path,
                                                               tmp_path: Path) -> None:
    """With the kernel's writeback cache every close marks the file's block count stale,
    and the next fstat is a GETATTR (dpkg reopens /etc/passwd for each file it unpacks): a
    transaction's mount goes without the cache, a user's writable mount keeps it."""
    image = copy_image(minbase_image, tmp_path / "m.imagefs")
    with opened(str(image), "1") as target:
        log = record_for(target.root).log  # type: ignore[union-attr]
        _reopen_and_fstat(os.path.join(target.root, "etc/passwd"))
    assert _getattrs_after(log) <= 2
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_imagefs("mount", "--rw", "--no-daemon", image, "1", mnt)
    try:
        log = record_for(str(mnt)).log  # type: ignore[union-attr]
        _reopen_and_fstat(str(mnt / "etc/passwd"))
    finally:
        run_imagefs("unmount", mnt, "--discard")
    assert _getattrs_after(log) >= 5  # the kernel asked again after each close


@pytest.mark.parametrize("volatile", [False, True])
def test_a_large_write_starts_its_way_to_disk_in_a_durable_session_only(
        every_type_tree: Path, tmp_path: Path, volatile: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """content.WRITEBACK_FROM: a write of 512 KiB or more into a durable session has the
    kernel start writing it to disk at once (files.start_writeback, sync_file_range), so
    that the writer's fsync finds it on its way; a small write, or any write into a
    volatile session (never written to disk on purpose), is left to the kernel."""
    from imagefs.format import files
    from imagefs.session import content
    from imagefs.session.lifecycle import Session, discard

    started: list[tuple[int, int]] = []

    def recorded(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        files.start_writeback(fd, offset, length)  # the real one: it must take the fd

    monkeypatch.setattr(content, "start_writeback", recorded)
    image = tmp_path / "t.imagefs"
    run_imagefs("capture", every_type_tree, image, "--name", "t")
    session = Session.create(str(image), "1", str(tmp_path / "nowhere"), volatile=volatile)
    try:
        tree = session.tree
        ino = tree.make(1, b"big", 0o100644, 0, 0).ino
        big = os.urandom(1 << 20)
        tree.write(ino, 0, big)
        tree.write(ino, 1 << 20, b"small" * 100)
        assert started == ([] if volatile else [(0, 1 << 20)])
        assert tree.read(ino, 0, 1 << 20) == big
    finally:
        session.close()
        discard(session.info)
