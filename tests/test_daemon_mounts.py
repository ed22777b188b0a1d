"""Read-only mounts made by the daemon's fork server (mounts.open, `imagefs mount` when a
daemon listens): the same mount, errors and records as the caller's own, made as the
caller, outliving the daemon."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import is_mounted, pid_alive, run_imagefs, unmount_hard, wait_until
from daemon_helpers import (
    NOBODY,
    TEST_GID,
    call_as_async,
    client,
    daemon_in_process,
    daemon_process,
    public_dir,
)

from daemon.protocol import INVALID_PARAMS


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("golden\n")
    image = tmp_path / "small.imagefs"
    run_imagefs("capture", src, image, "--name", "base")
    return image


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode().strip()


def own_mounts(under: Path) -> list[dict]:
    """`imagefs mounts --json`, only the mounts under this test's directory (the listing
    shows every imagefs mount of the machine, a mount made outside the tests included)."""
    return [m for m in json.loads(run_imagefs("mounts", "--json").stdout)
            if m["mountpoint"].startswith(f"{under}/")]


def test_imagefs_mount_through_the_daemon(tmp_path: Path, small_image: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rec: dict = {}
    try:
        with daemon_process(tmp_path) as d:
            env = {"IMAGEFS_SOCKET": str(d.sock)}
            server = [p for p in children_of(d.pid) if "forkserver" in cmdline(p)]
            assert len(server) == 1, [cmdline(p) for p in children_of(d.pid)]
            rec = json.loads(run_imagefs("mount", small_image, "base", mnt, "--json",
                                         "--daemon", env=env).stdout)
            assert rec["mode"] == "ro" and rec["mountpoint"] == str(mnt)
            assert (mnt / "etc" / "hostname").read_text() == "golden\n"
            # The mount process is its own (not the daemon's, not the server's), says
            # what it serves, and is recorded where the caller's `imagefs mounts` looks.
            assert rec["pid"] not in children_of(d.pid) + children_of(server[0])
            assert cmdline(rec["pid"]) == f"imagefs mount {small_image} 1 {mnt}"
            listed = own_mounts(tmp_path)
            assert [(m["mountpoint"], m["pid"]) for m in listed] == [(str(mnt), rec["pid"])]
            # Every refusal is word for word what the caller's own mount says.
            for args in (["base", mnt],                          # already mounted
                         ["nine", tmp_path / "other"],           # no such index
                         ["base", tmp_path / "missing"],         # no such directory
                         ["base", tmp_path, "-o", "no_such_option"]):
                via = run_imagefs("mount", small_image, *args, env=env, check=False)
                own = run_imagefs("mount", small_image, *args, "--no-daemon", check=False)
                assert via.returncode != 0 and via.stderr.count(b"\n") == 1, via.stderr
                assert (via.returncode, via.stderr) == (own.returncode, own.stderr)
            d.kill(signal.SIGTERM)
            assert wait_until(lambda: not pid_alive(server[0]), 10)
        # The daemon and its server are gone; the mount is not.
        assert is_mounted(mnt) and (mnt / "etc" / "hostname").read_text() == "golden\n"
        run_imagefs("unmount", mnt)
        assert not is_mounted(mnt) and wait_until(lambda: not pid_alive(rec["pid"]), 10)
    finally:
        if is_mounted(mnt):
            unmount_hard(mnt, rec.get("pid"))


@pytest.mark.trio
async def test_a_mount_is_made_as_the_caller(tmp_path: Path, small_image: Path) -> None:
    pub = public_dir("imagefs-d-")
    sock = pub / "d.sock"
    mnt = pub / "mnt"
    mnt.mkdir()
    os.chown(mnt, NOBODY, NOBODY)
    secret = pub / "secret.imagefs"
    secret.write_bytes(small_image.read_bytes())
    secret.chmod(0o600)  # root's: the daemon could read it, the caller may not
    async with daemon_in_process(sock) as d:
        r = await call_as_async(sock, NOBODY, [TEST_GID], "mounts.open", image=str(secret),
                                index="base", mountpoint=str(mnt))
        assert r["error"]["code"] == -32008, r
        assert r["error"]["message"] == f"{secret}: Permission denied", r
        assert not is_mounted(mnt)
        r = await call_as_async(sock, NOBODY, [TEST_GID], "mounts.open",
                                image="small.imagefs", index=1, mountpoint=str(mnt))
        assert r["error"]["code"] == INVALID_PARAMS, r
        # A server that died is started again for the next mount.
        proc = d.fork_server._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        async with client(sock) as c:
            rec = await c.call("mounts.open", image=str(small_image), index=1,
                               mountpoint=str(mnt), options=["cache=8M"])
        try:
            assert (mnt / "etc" / "hostname").read_text() == "golden\n"
        finally:
            unmount_hard(mnt, rec["pid"])
