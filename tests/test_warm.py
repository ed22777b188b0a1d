"""Reading ahead in a transaction's mount (imagefs.mount.warm, Change.reads): only regular
files inside the root are read, never through a symlink and never a device or a FIFO;
the fork server reads them after it answered, and lets go of the mount when asked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import copy_image, fixture_tree

from daemon.forked_server import fork_server
from daemon.forkserver import MountForkServer, MountRequest
from imagefs.mount import warm as warm_module
from imagefs.mount.warm import warm
from servicing.reads import DPKG_READS


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_bytes(b"s" * 100)
    for n in ("a", "b", "c"):
        (root / f"var/lib/dpkg/info/{n}.list").write_bytes(b"l" * 10)
    (root / "var/lib/dpkg/info/a.md5sums").write_bytes(b"m" * 1000)
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/libc.so.6").write_bytes(b"c" * 7)
    return root


def test_the_named_regular_files_are_read_and_nothing_else(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    got = warm(str(root), ["var/lib/dpkg/status", "var/lib/dpkg/info/*.list",
                           "usr/lib/*-linux-*/libc.so.6", "missing/file", "var/lib/dpkg/x"])
    assert got == 100 + 3 * 10 + 7


def test_a_path_ending_in_a_slash_is_only_looked_up(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert warm(str(root), ["var/lib/dpkg/", "var/lib/dpkg/status/", "nothing/"]) == 0


def test_the_containers_reads_name_what_the_runner_touches_first() -> None:
    """reads.CONTAINER_READS is kept true to servicing.runner: the directories bwrap
    mounts over and the policy-rc.d names it looks for come first of every change."""
    from servicing import runner
    from servicing.reads import CONTAINER_READS

    for name in runner.MOUNT_POINTS:
        assert f"{name}/" in CONTAINER_READS
    for name in (runner.POLICY_RC_D, runner.SAVED_POLICY):
        assert f"usr/sbin/{name}" in CONTAINER_READS
    assert DPKG_READS[:len(CONTAINER_READS)] == CONTAINER_READS


def test_no_symlink_is_followed_nor_dotdot_taken(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * 5000)
    (root / "etc").symlink_to(tmp_path)  # a directory outside
    (root / "var/lib/dpkg/info/z.list").symlink_to(outside)  # a file outside
    (root / "abs").symlink_to("/")
    got = warm(str(root), ["etc/secret", "abs/etc/passwd", "var/lib/dpkg/info/z.list",
                           "../secret", "var/../../secret", "var/lib/dpkg/info/*.list"])
    assert got == 3 * 10


def test_a_fifo_or_device_is_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO without a writer would block, and a device node of the image opens
    the host's device (the mount has `dev`): both are only looked at (O_PATH)."""
    root = _tree(tmp_path)
    os.mkfifo(root / "var/lib/dpkg/available")
    if os.geteuid() == 0:
        os.mknod(root / "var/lib/dpkg/arch", 0o600 | 0o020000, os.makedev(1, 5))  # zero
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(
        warm(str(root), ["var/lib/dpkg/available", "var/lib/dpkg/arch"])), daemon=True)
    t.start()
    t.join(5)
    assert done == [0]


def test_a_directory_is_listed_once_and_the_budget_and_stop_are_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path)
    listed = []
    real = os.scandir

    def counted(fd):  # type: ignore[no-untyped-def]
        listed.append(fd)
        return real(fd)

    monkeypatch.setattr(warm_module.os, "scandir", counted)
    assert warm(str(root), ["var/lib/dpkg/info/a*", "var/lib/dpkg/info/b*",
                            "var/lib/dpkg/info/*.list"]) == 1010 + 10 + 30
    assert len(listed) == 1
    assert warm(str(root), ["var/lib/dpkg/info/*"], budget=15) == 15
    assert warm(str(root), ["var/lib/dpkg/info/*.list"], stop=lambda: True) == 10


def test_the_dpkg_reads_name_real_files_of_a_fixture() -> None:
    """DPKG_READS names what a real Debian root has (a list kept true to what dpkg reads,
    not a guess that reads nothing): its database, the programs and their libraries."""
    root = fixture_tree("bookworm-minbase")
    everything = sum(p.stat().st_size for p in [
        root / "var/lib/dpkg/status", *root.glob("var/lib/dpkg/info/*.list"),
        root / "usr/bin/dpkg", root / "usr/bin/tar",
        root / "usr/lib/x86_64-linux-gnu/libc.so.6"])
    assert warm(str(root), DPKG_READS) > everything


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None,
                    reason="needs root and FUSE")
def test_the_fork_server_reads_ahead_after_answering_and_lets_go_when_released(
        minbase_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child that made the mount answers first, then reads (the status file is in
    the page cache: fincore); the mount cannot be unmounted until release(), which ends
    the reading and waits for the child to let go."""
    from imagefs.mount.kernel import umount
    from servicing.transaction import _clear

    monkeypatch.setenv("IMAGEFS_RUN_DIR", str(tmp_path / "run"))
    image = copy_image(minbase_image, tmp_path / "m.imagefs")
    mnt = tmp_path / "run" / "servicing" / "t" / "1"
    mnt.mkdir(parents=True)
    server = MountForkServer(fork_server, fork_server())
    try:
        pending = server.begin(MountRequest(
            image=str(image), index="1", mountpoint=str(mnt), writable=True,
            tied_to=os.getpid(), volatile=True, warm=["var/lib/dpkg/status"] * 2000))
        try:
            record = pending.wait()
            assert record["mountpoint"] == str(mnt)
            status = mnt / "var/lib/dpkg/status"
            for _ in range(100):
                resident = subprocess.run(["fincore", "-n", "-o", "PAGES", str(status)],
                                          capture_output=True, text=True).stdout.strip()
                if resident and int(resident) > 0:
                    break
                threading.Event().wait(0.02)
            assert resident and int(resident) > 0
        finally:
            pending.release()
        assert umount(str(mnt)) == 0  # nothing of the child's is left open in it
    finally:
        server.close()
        _clear(str(mnt.parent))
    assert not mnt.parent.exists()


def test_a_released_request_answers_no_more(tmp_path: Path) -> None:
    """release() before wait(): the answer is not read any more, and wait() says so."""
    from daemon.forkserver import PendingMount
    from imagefs.errors import MountRefused

    ours, theirs = socket.socketpair()
    pending = PendingMount(MountRequest(image="i", index="1", mountpoint="/m"), ours, 1.0)
    theirs.close()
    pending.release()
    with pytest.raises(MountRefused, match="let go"):
        pending.wait()
