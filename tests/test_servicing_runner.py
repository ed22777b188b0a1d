"""servicing/runner.py: the image's own programs in a container rooted at a copy of a real
Debian root (bookworm-minbase), with the host as the oracle of what must not leak in."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fixture_tree, mounted_rw, rsync_diff, run_imagefs

from imagefs.errors import Busy, SystemFailure, UsageError
from servicing import runner
from servicing.runner import POLICY_SCRIPT, dpkg_options, run

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or os.geteuid() != 0,
                                reason="needs root and bwrap (bubblewrap)")


@pytest.fixture(scope="module")
def source() -> Path:
    return fixture_tree("bookworm-minbase")


@pytest.fixture(scope="module")
def root(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A writable copy of the shared tree (~1 s with cp -a); every test leaves it as found."""
    dst = tmp_path_factory.mktemp("runner") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(dst)], check=True)
    yield dst
    assert not mounts_under(dst.parent)
    shutil.rmtree(dst.parent)


def mounts_under(path: Path) -> list[str]:
    """The host's mountinfo lines of mount points at or under path."""
    p = str(path)
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if ln.split()[4] == p or ln.split()[4].startswith(p + "/")]


def sh(root: Path, script: str, **kw: object) -> runner.Completed:
    return run(root, ["sh", "-c", script], **kw)  # type: ignore[arg-type]


def test_run_leaves_root_unchanged(root: Path, source: Path) -> None:
    out = sh(root, "echo hello; touch /tmp/x")  # /tmp is the container's tmpfs
    assert (out.returncode, out.stdout, out.stderr) == (0, b"hello\n", b"")
    assert rsync_diff(source, root) == ""
    assert not mounts_under(root)


def test_dpkg_query_inside_matches_the_database(root: Path) -> None:
    inside = run(root, ["dpkg-query", "-W"])
    outside = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W"],
                             capture_output=True, check=True)
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == outside.stdout
    assert len(inside.stdout.splitlines()) > 50


def test_private_namespaces_no_network(root: Path) -> None:
    kinds = ("mnt", "pid", "net", "uts", "ipc")
    out = sh(root, "echo $$; hostname; echo sys:$(ls -A /sys | wc -l); "
             "tail -n +3 /proc/net/dev; "
             + "; ".join(f"readlink /proc/self/ns/{k}" for k in kinds))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert int(lines[0]) <= 2  # pid 2: bwrap's init is 1
    assert lines[1] != socket.gethostname() and lines[1].startswith("imagefs-")
    assert lines[2] == "sys:0"  # nothing of the host's hardware
    assert lines[3].split(":")[0].strip() == "lo"  # the only network device
    namespaces = lines[4:]
    assert len(namespaces) == len(kinds)
    for kind, ns in zip(kinds, namespaces, strict=True):
        assert ns != os.readlink(f"/proc/self/ns/{kind}"), kind
    # a fresh /proc: the host's processes are not there
    count = sh(root, "ls -d /proc/[0-9]* | wc -l")
    assert int(count.stdout) < 10


def test_root_in_the_container_cannot_reach_the_host(root: Path) -> None:
    """A hostile maintainer script runs as root, but without the capabilities that would
    reach the host: no device node (a host disk), no mount, no module, no clock."""
    out = sh(root, "mknod /tmp/disk b 8 0 && echo made; "
                   "mount -t tmpfs x /mnt && echo mounted; "
                   "date -s 2000-01-01 >/dev/null 2>&1 && echo clock; "
                   "grep -E 'CapPrm|NoNewPrivs' /proc/self/status")
    assert b"made" not in out.stdout and b"mounted" not in out.stdout
    assert b"clock" not in out.stdout
    status = dict(line.split(b":\t") for line in out.stdout.splitlines())
    permitted = int(status[b"CapPrm"], 16)
    assert permitted & (1 << 21) == 0 and permitted & (1 << 27) == 0  # sys_admin, mknod
    assert permitted & 1  # chown: dpkg still owns files to the image's users
    assert status[b"NoNewPrivs"] == b"1"  # no setuid or file capability gives them back
    assert not (root / "tmp/disk").exists()


def test_host_configuration_does_not_leak_in(root: Path) -> None:
    resolv = root / "etc/resolv.conf"
    before = resolv.read_bytes()
    resolv.write_bytes(b"# the root's own resolv.conf\n")
    try:
        out = sh(root, "cat /etc/resolv.conf")
        assert out.stdout == b"# the root's own resolv.conf\n"
        for d in ("etc/apt/apt.conf.d", "etc/dpkg/dpkg.cfg.d", "var/log"):
            out = run(root, ["ls", "-A", "/" + d])
            assert sorted(out.stdout.split()) == sorted(map(os.fsencode, os.listdir(root / d)))
    finally:
        resolv.write_bytes(before)


def test_environment_and_input(root: Path) -> None:
    out = sh(root, 'echo "$DEBIAN_FRONTEND $LC_ALL $EXTRA"; cat', env={"EXTRA": "x y"},
             input=b"from stdin\n")
    assert out.stdout == b"noninteractive C.UTF-8 x y\nfrom stdin\n"
    assert dpkg_options() == ["--force-confdef", "--force-confold"]
    out = run(root, ["dpkg", *dpkg_options(), "--audit"])
    assert out.returncode == 0, out.stderr


def test_failing_command_returns_code_and_stderr(root: Path) -> None:
    out = sh(root, "echo out; echo oops >&2; exit 7")
    assert (out.returncode, out.stdout, out.stderr) == (7, b"out\n", b"oops\n")
    out = run(root, ["no-such-command"])
    assert out.returncode == 127 and b"no-such-command" in out.stderr
    out = run(root, ["dpkg", "--no-such-option"])
    assert out.returncode == 2 and out.stderr


def test_policy_rc_d_during_run_only(root: Path) -> None:
    path = root / "usr/sbin/policy-rc.d"
    assert not path.exists()
    out = sh(root, "/usr/sbin/policy-rc.d; echo $?")
    assert out.stdout == b"101\n"
    assert not path.exists()


def test_existing_policy_rc_d_restored_exactly(root: Path) -> None:
    path = root / "usr/sbin/policy-rc.d"
    path.write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o700)
    os.utime(path, ns=(1, 2_000_000_003))
    before = os.lstat(path)
    try:
        out = sh(root, "/usr/sbin/policy-rc.d; echo $?")
        assert out.stdout == b"101\n"
        after = os.lstat(path)
        assert path.read_bytes() == b"#!/bin/sh\nexit 0\n"
        assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
            before.st_ino, before.st_mode, before.st_mtime_ns)
        assert not (root / "usr/sbin" / runner.SAVED_POLICY).exists()
    finally:
        path.unlink()


def test_stale_policy_rc_d_of_a_killed_run_is_recovered(root: Path) -> None:
    sbin = root / "usr/sbin"
    (sbin / "policy-rc.d").write_bytes(POLICY_SCRIPT)  # a killed run's
    sh(root, "true")
    assert not (sbin / "policy-rc.d").exists()
    (sbin / "policy-rc.d").write_bytes(POLICY_SCRIPT)
    (sbin / runner.SAVED_POLICY).write_bytes(b"#!/bin/sh\nexit 0\n")  # and the root's own
    sh(root, "true")
    assert (sbin / "policy-rc.d").read_bytes() == b"#!/bin/sh\nexit 0\n"
    assert not (sbin / runner.SAVED_POLICY).exists()
    (sbin / "policy-rc.d").unlink()


def test_read_only_bind(root: Path, tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / "a.deb").write_bytes(b"not really")
    out = sh(root, "cat /run/debs/a.deb; touch /run/debs/b 2>/dev/null || echo ro",
             binds=[(str(debs), "/run/debs")])
    assert out.stdout == b"not reallyro\n"
    assert os.listdir(debs) == ["a.deb"]
    assert not (root / "run/debs").exists()
    with pytest.raises(UsageError, match="under /run/"):
        run(root, ["true"], binds=[(str(debs), "/srv/debs")])
    assert not mounts_under(root) and not mounts_under(debs)


def test_timeout_kills_everything(root: Path) -> None:
    tag = "31.4159"
    before = os.stat(root / "usr/sbin")
    start = time.monotonic()
    with pytest.raises(SystemFailure, match="longer than 1 s"):
        sh(root, f"sleep {tag} & sleep {tag}; wait", timeout=1)
    after = os.stat(root / "usr/sbin")
    assert time.monotonic() - start < 5
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert tag not in ps  # in the argv of every process of the run, bwrap included
    assert not mounts_under(root)
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert (after.st_mtime_ns, after.st_nlink) == (before.st_mtime_ns, before.st_nlink)


def test_usage_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        run(tmp_path / "missing", ["true"])
    with pytest.raises(UsageError, match="no /usr/bin/env"):
        run(tmp_path, ["true"])
    with pytest.raises(UsageError, match="nothing to run"):
        run(root, [])
    with pytest.raises(UsageError, match="bad environment"):
        run(root, ["true"], env={"A=B": "c"})
    with pytest.raises(UsageError, match="cannot bind"):
        run(root, ["true"], binds=[(str(tmp_path), "relative")])
    symlinked = tmp_path / "r"
    (symlinked / "usr/bin").mkdir(parents=True)
    (symlinked / "usr/bin/env").touch()
    (symlinked / "usr/sbin").symlink_to(tmp_path / "host")
    (tmp_path / "host").mkdir()
    for name in ("dev", "proc", "run", "tmp"):
        (symlinked / name).mkdir()
    with pytest.raises(UsageError, match="usr/sbin is not a directory"):
        run(symlinked, ["true"])
    assert os.listdir(tmp_path / "host") == []
    (symlinked / "tmp").rmdir()
    (symlinked / "tmp").symlink_to(tmp_path / "host")
    with pytest.raises(UsageError, match="/tmp is not a directory"):
        run(symlinked, ["true"])


def test_one_run_per_root(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(Busy, match="a servicing run is using this root"):
            run(root, ["true"])
    finally:
        os.close(fd)


def test_missing_bwrap_says_what_to_install(root: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "HOST_PATH", str(tmp_path))
    with pytest.raises(SystemFailure) as e:
        run(root, ["true"])
    assert str(e.value) == "bwrap: not found; install the Debian package bubblewrap"


def test_a_writable_mount_of_an_image_is_a_root_to_run_in(tmp_path: Path) -> None:
    """The case servicing is for: the image's own dpkg runs on a session's mount, what it
    writes lands in the session, and the run leaves only the FUSE mount itself."""
    image = tmp_path / "m.imagefs"
    run_imagefs("capture", fixture_tree("bookworm-minbase"), image, "--name", "minbase")
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        inside = run(mnt, ["dpkg-query", "-W"])
        outside = subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W"],
                                 capture_output=True, check=True).stdout
        assert inside.returncode == 0 and inside.stdout == outside
        wrote = run(mnt, ["sh", "-c", "echo serviced > /root/mark && test -x "
                                      "/usr/sbin/policy-rc.d"])
        assert wrote.returncode == 0, wrote.stderr
        assert (mnt / "root/mark").read_text() == "serviced\n"
        assert not (mnt / "usr/sbin/policy-rc.d").exists()
        with open("/proc/self/mountinfo") as fh:
            under = [line.split()[4] for line in fh if line.split()[4].startswith(str(mnt))]
        assert under == [str(mnt)]

