"""A servicing transaction's mount runs without trio (imagefs/mount/plain_loop.py): its fork
server never imports trio, the mount ends on its signals and with its verb as a trio mount
does, and nothing but its verb may commit it (it has no control socket)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_imagefs

from imagefs.mount.kernel import find_mount
from imagefs.mount.registry import record_for
from imagefs.session.info import find_session
from imagefs.session.mounts import start
from servicing.transaction import opened

needs_fuse = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None,
                                reason="needs root and FUSE")


def _imports_trio(preload: str) -> bool:
    """Whether a fresh interpreter holds trio after daemon.forkserver's preload(preload)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, daemon.forkserver as f; "
         f"f.preload(f.{preload}); print('trio' in sys.modules)"],
        capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_a_verbs_own_fork_server_imports_no_trio_and_the_daemons_does() -> None:
    assert not _imports_trio("MOUNT_MODULES")
    assert _imports_trio("DAEMON_MODULES")


@pytest.fixture
def image(tmp_path: Path, every_type_tree: Path) -> Path:
    path = tmp_path / "t.imagefs"
    run_imagefs("capture", every_type_tree, path, "--name", "t")
    return path


def _wait_gone(path: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while find_mount(path) is not None:
        assert time.monotonic() < deadline, f"{path} is still mounted"
        time.sleep(0.05)


def _log_after_unmount(log: str) -> str:
    deadline = time.monotonic() + 10
    while "unmounted from" not in (text := Path(log).read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


@needs_fuse
def test_a_transactions_mount_refuses_any_other_commit_and_ends_on_sigterm(
        image: Path) -> None:
    with opened(str(image), "1") as target:
        rec = record_for(target.root)
        assert rec is not None
        with open(os.path.join(target.root, "made-here"), "w") as fh:
            fh.write("kept in the staging\n")
        for argv in (["commit", target.root], ["unmount", target.root, "--commit"]):
            done = run_imagefs(*argv, check=False)
            assert done.returncode == 2, done.stderr
            assert b"servicing transaction's" in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
        assert find_mount(target.root) is not None  # refused: it goes on serving
        os.kill(rec.pid, signal.SIGTERM)
        _wait_gone(target.root)
        text = _log_after_unmount(rec.log)
        assert "SIGTERM: unmounting" in text
        info = find_session(rec.session)  # the staging was written at the end
        assert not info.live() and info.volatile
        # the workspace goes with the transaction (opened's exit), mount or no mount


@needs_fuse
def test_a_transactions_mount_whose_verb_ended_before_it_came_up_ends_at_once(
        image: Path, tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rec = None
    try:
        rec = start(str(image), "1", str(mnt), [], writable=True, tied_to=gone.pid,
                    volatile=True)
    except Exception as e:  # noqa: BLE001 - it may end before it says it is ready
        assert "mount" in str(e).lower()
    try:
        _wait_gone(str(mnt))
    finally:
        if rec is not None:
            assert "ended: unmounting" in _log_after_unmount(rec.log)
        run_imagefs("cleanup", mnt, check=False)  # its session, if it made one
