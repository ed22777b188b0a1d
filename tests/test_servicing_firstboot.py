"""The first-boot queue (servicing/firstboot.py, `imagefs firstboot`): items queued offline
run once, in order, when the index really boots (systemd-nspawn --boot of a writable
mount, the image's own systemd as pid 1); results are kept in the image and the journal;
a power cut mid-item runs it again; a second boot runs nothing.  Oracles: the boot itself,
`systemctl --root`, `systemctl show` inside the booted system, `journalctl -D`, the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_image, mounted, mounted_rw, run_imagefs, wait_until
from servicing_helpers import HELLO, NEEDS_DEBS, NEEDS_NSPAWN, sha

from servicing import firstboot
from servicing.firstboot import enqueue, list_items, pending
from servicing.firstboot_files import DONE, QUEUE, RUNNER_PATH, UNIT_NAME
from servicing.roots import MountRoot

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

BOOT_TIMEOUT = 120.0
PROBE = "/var/tmp/imagefs-test-probe"
PROBE_UNIT = f"""\
[Unit]
Description=imagefs test probe: what the first-boot unit did, then power off
After=imagefs-firstboot.service multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'systemctl show {UNIT_NAME} -p ActiveState -p Result \
-p ExecMainStatus -p ConditionResult > {PROBE}; systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
"""
FAILING = "echo 'first item here' >> /root/order; echo 'to stdout'; echo 'to stderr' >&2; exit 3"
MARKING = "echo 'second item here' >> /root/order; echo done > /var/lib/imagefs-test-marker"


@pytest.fixture(scope="module")
def minbase(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase (systemd, systemd-sysv) as index 1: the module's copy of the
    session's capture.  Shared: copy it."""
    return copy_image(minbase_image,
                      tmp_path_factory.mktemp("firstboot") / "minbase.imagefs")


@pytest.fixture
def image(minbase: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "t.imagefs"
    shutil.copyfile(minbase, copy)
    return copy




def items_of(*where: str | Path) -> list[dict]:
    """`firstboot list --json` of IMAGE INDEX, or of --mount MNT."""
    args = ["--mount", where[0]] if len(where) == 1 else list(where)
    return json.loads(run_imagefs("firstboot", "list", *args, "--json").stdout)["items"]


def add(image: Path, command: str, name: str) -> None:
    run_imagefs("firstboot", "add", image, "1", "--command", command, "--name", name)


def refused(*args: str | Path, code: int = 2) -> str:
    r = run_imagefs(*args, check=False)
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert err.count("\n") == 1 and err.startswith("imagefs: "), err
    return err


def place_probe(mnt: Path) -> None:
    units = mnt / "etc/systemd/system"
    (units / "imagefs-test-probe.service").write_text(PROBE_UNIT)
    link = units / "multi-user.target.wants/imagefs-test-probe.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/imagefs-test-probe.service")


def boot_argv(mnt: Path) -> list[str]:
    """systemd-nspawn --boot of mnt inside a mount and pid namespace that die with it (as
    servicing/runner.py does it: nothing it mounts stays on the host, also when killed)."""
    return ["setpriv", "--pdeathsig", "KILL", "unshare", "--mount", "--propagation",
            "private", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
            "/bin/sh", "-ec", "mkdir -p /run/systemd/nspawn\n"
            "mount -t tmpfs -o mode=0755,size=1m imagefs-nspawn /run/systemd/nspawn\n"
            'exec "$@"', "sh",
            "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--settings=no",
            "--private-network", "--resolv-conf=off", "--timezone=off",
            "--link-journal=no", "--console=pipe", "-D", str(mnt), "--boot"]


@contextlib.contextmanager
def booting(mnt: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The index at mnt booting; killed (a power cut) if still running at the end."""
    proc = subprocess.Popen(boot_argv(mnt), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                 "SYSTEMD_NSPAWN_LOCK": "0"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)  # unshare: its child, the namespaces' init,
        proc.communicate(timeout=30)  # dies with it, and every process of the boot


def boot(mnt: Path) -> tuple[dict[str, str], float]:
    """Boot the index at mnt until the probe powers it off; what the probe saw about the
    first-boot unit, and the boot's seconds."""
    place_probe(mnt)
    (mnt / PROBE.lstrip("/")).unlink(missing_ok=True)
    start = time.monotonic()
    with booting(mnt) as proc:
        try:
            out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the boot of {mnt} took longer than {BOOT_TIMEOUT} s")
    took = time.monotonic() - start
    assert proc.returncode == 0, out.decode(errors="replace")
    shown = (mnt / PROBE.lstrip("/")).read_text()
    return dict(line.split("=", 1) for line in shown.splitlines()), took


def journal(mnt: Path) -> str:
    return subprocess.run(["journalctl", "-D", str(mnt / "var/log/journal"), "-u", UNIT_NAME,
                           "-o", "cat", "--no-pager"],
                          capture_output=True, text=True, check=True).stdout


def results(mnt: Path) -> dict[str, bytes]:
    """Every file under done/, with its bytes."""
    done = mnt / DONE.lstrip("/")
    return {str(p.relative_to(done)): p.read_bytes() for p in sorted(done.rglob("*"))
            if p.is_file()}


def hello_status(mnt: Path) -> str:
    return subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W",
                           "-f=${db:Status-Abbrev}", "hello"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_boot_runs_the_queue_once_in_order(image: Path, tmp_path: Path) -> None:
    add(image, FAILING, "fails")
    add(image, MARKING, "marker")
    run_imagefs("package", "add", image, "1", HELLO, "--defer-configure")
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        enabled = subprocess.run(["systemctl", f"--root={mnt}", "is-enabled", UNIT_NAME],
                                 capture_output=True, text=True)
        assert enabled.stdout.strip() == "enabled"
        assert [i["state"] for i in items_of(mnt)] == ["queued"] * 3
        assert hello_status(mnt) == "iU"
        seen, took = boot(mnt)
        print(f"first boot: {took:.2f} s")
        assert seen["ConditionResult"] == "yes"
        assert (seen["Result"], seen["ExecMainStatus"]) == ("exit-code", "1")  # one failed
        assert (mnt / "root/order").read_text() == "first item here\nsecond item here\n"
        assert (mnt / "var/lib/imagefs-test-marker").read_text() == "done\n"
        assert hello_status(mnt) == "ii"  # configured at boot, by the image's dpkg
        assert not os.listdir(mnt / QUEUE.lstrip("/"))
        kept = results(mnt)
        assert kept["0001-fails/result"].startswith(b"exit=3\n")
        assert kept["0001-fails/output"] == b"to stdout\nto stderr\n"
        assert kept["0002-marker/result"].startswith(b"exit=0\n")
        logged = journal(mnt)
        assert "0001-fails: failed with exit code 3" in logged
        assert "  | to stderr" in logged and "0002-marker: succeeded" in logged
        run_imagefs("commit", mnt)
        seen, took = boot(mnt)  # the second boot: the unit's condition skips it
        print(f"second boot: {took:.2f} s")
        assert seen["ConditionResult"] == "no" and seen["ActiveState"] == "inactive"
        assert results(mnt) == kept
        assert (mnt / "root/order").read_text() == "first item here\nsecond item here\n"
        on_mount = items_of(mnt)
    listed = items_of(image, "1")  # the results are in the image, read without a mount
    assert listed == on_mount
    assert [(i["id"], i["name"], i["state"], i["exit_code"]) for i in listed] == [
        ("0001", "fails", "failed", 3), ("0002", "marker", "succeeded", 0),
        ("0003", "configure-packages", "succeeded", 0)]
    assert any("hello" in line for line in listed[2]["output"])
    assert listed[0]["output"] == ["to stdout", "to stderr"] and listed[0]["attempts"] == 1
    assert listed[0]["started"] and listed[0]["finished"] and listed[0]["boot_id"]
    text = run_imagefs("firstboot", "list", image, "1").stdout.decode()
    assert "failed     3" in text and "| to stderr" in text and "0 items will run" in text
    out = run_imagefs("firstboot", "add", image, "1", "--command", "true").stdout.decode()
    assert "queue first-boot item 0004-command" in out  # ids go on after those that ran
    assert "install" not in out  # the unit is there already


def test_a_power_cut_mid_item_runs_it_again(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    cut = ("if [ -e /var/tmp/cut-once ]; then echo 'second run'; exit 0; fi\n"
           "echo 'first run'; touch /var/tmp/cut-once; sync; sleep 600\n")
    with mounted_rw(image, 1, mnt):
        assert enqueue(str(mnt), "cut", f"#!/bin/sh\n{cut}".encode(), "test") == "0001"
        with booting(mnt):  # killed once the item is under way: a power cut
            assert wait_until(lambda: (mnt / "var/tmp/cut-once").exists(), BOOT_TIMEOUT)
        # Two more cuts, made by hand: one before the item finished (started, no result),
        # one after it finished but before it was filed into done/ (a result).
        enqueue(str(mnt), "started", b"#!/bin/sh\ntouch /var/tmp/started-ran\n")
        enqueue(str(mnt), "finished", b"#!/bin/sh\ntouch /var/tmp/finished-ran\n")
        queue = mnt / QUEUE.lstrip("/")
        (queue / "0002-started/started").write_text("started=then\n")
        (queue / "0003-finished/result").write_text("exit=0\nattempts=1\n")
        assert [(i["id"], i["state"]) for i in items_of(mnt)] == [
            ("0001", "interrupted"), ("0002", "interrupted"), ("0003", "succeeded")]
        assert [i.id for i in pending(MountRoot(str(mnt)))] == ["0001", "0002"]
        seen, _took = boot(mnt)
        assert seen["Result"] == "success"
        done = {i["name"]: i for i in items_of(mnt)}
        assert done["cut"]["state"] == "succeeded" and done["cut"]["attempts"] == 2
        assert done["cut"]["output"] == [
            "first run",
            "=== imagefs-firstboot: attempt 2 (the previous one was interrupted) ===",
            "second run"]
        assert done["started"]["attempts"] == 2 and (mnt / "var/tmp/started-ran").exists()
        assert done["finished"]["path"].startswith(DONE)
        assert not (mnt / "var/tmp/finished-ran").exists()  # finished: never run again
        assert "0001-cut: was interrupted before it finished" in journal(mnt)


def test_the_unit_and_runner_in_the_image(image: Path, tmp_path: Path) -> None:
    before = sha(image)
    out = run_imagefs("firstboot", "add", image, "1", "--command", "true", "--dry-run")
    assert b"install /usr/lib/imagefs/firstboot" in out.stdout and sha(image) == before
    add(image, "true", "noop")
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt):
        runner = mnt / RUNNER_PATH.lstrip("/")
        assert runner.stat().st_mode & 0o777 == 0o755
        assert subprocess.run(["sh", "-n", str(runner)]).returncode == 0
        verify = subprocess.run(["systemd-analyze", f"--root={mnt}", "verify",
                                 f"/etc/systemd/system/{UNIT_NAME}"],
                                capture_output=True, text=True)
        assert UNIT_NAME not in verify.stderr, verify.stderr
        state = mnt / "var/lib/imagefs/firstboot"
        assert state.stat().st_mode & 0o777 == 0o700  # scripts and outputs may hold secrets
        assert items_of(mnt) == items_of(image, "1")


def test_remove_by_id_and_name_and_what_cannot_be_removed(image: Path,
                                                           tmp_path: Path) -> None:
    for name in ("one", "two", "three"):
        add(image, f"echo {name}", name)
    run_imagefs("firstboot", "remove", image, "1", "2", "three")
    assert [(i["id"], i["name"]) for i in items_of(image, "1")] == [("0001", "one")]
    before = sha(image)
    assert "no first-boot item 'nine'" in refused("firstboot", "remove", image, "1", "nine")
    refused("firstboot", "remove", image, "1", "2")
    refused("firstboot", "remove", image, "1")
    assert sha(image) == before
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):  # item 1 ran: file it as the runner would
        item = mnt / QUEUE.lstrip("/") / "0001-one"
        (item / "result").write_text("exit=0\n")
        item.rename(mnt / DONE.lstrip("/") / "0001-one")
        run_imagefs("commit", mnt)
    before = sha(image)
    err = refused("firstboot", "remove", image, "1", "one")
    assert "already ran (succeeded, exit code 0): it is history" in err
    assert sha(image) == before


@pytest.mark.parametrize("name", ["../x", "a/b", "", "-rf", ".hidden", "x" * 65, "0123",
                                  "new\nline", "sp ace", "é"])
def test_hostile_names_are_refused(minbase: Path, name: str) -> None:
    before = sha(minbase)
    err = refused("firstboot", "add", minbase, "1", "--command", "true", f"--name={name}")
    assert "bad first-boot item name" in err
    assert sha(minbase) == before


def test_bad_scripts_are_refused(minbase: Path, tmp_path: Path) -> None:
    before = sha(minbase)
    big = tmp_path / "big.sh"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x7fELF\0\0\xff")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "no such file" in refused("firstboot", "add", minbase, "1", "--script",
                                     tmp_path / "missing.sh", code=3)
    for path, words in ((tmp_path, "not a regular file"), (fifo, "not a regular file"),
                        ("/dev/zero", "not a regular file"), (big, "over the limit"),
                        (binary, "not UTF-8")):
        assert words in refused("firstboot", "add", minbase, "1", "--script", path)
    assert "empty" in refused("firstboot", "add", minbase, "1", "--command", " ")
    r = run_imagefs("firstboot", "add", minbase, "1", check=False)
    assert r.returncode == 2 and b"--command" in r.stderr
    r = run_imagefs("firstboot", "add", minbase, "1", "--command", "x", "--script", big,
                    check=False)
    assert r.returncode == 2
    assert sha(minbase) == before


def test_a_script_file_names_its_item(image: Path, tmp_path: Path) -> None:
    script = tmp_path / "enroll host!.sh"
    script.write_text("#!/bin/sh\necho enrolled\n")
    run_imagefs("firstboot", "add", image, "1", "--script", script)
    [item] = items_of(image, "1")
    assert (item["name"], item["origin"]) == ("enroll-host-.sh",
                                               "firstboot add --script enroll host!.sh")


def test_an_index_without_systemd_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src/etc").mkdir(parents=True)
    (tmp_path / "src/usr/bin").mkdir(parents=True)
    image = tmp_path / "bare.imagefs"
    run_imagefs("capture", tmp_path / "src", image, "--name", "bare")
    before = sha(image)
    assert "no systemd" in refused("firstboot", "add", image, "1", "--command", "true")
    assert sha(image) == before
    assert b"No first-boot items" in run_imagefs("firstboot", "list", image, "1").stdout


def test_a_masked_unit_is_refused(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        subprocess.run(["systemctl", f"--root={mnt}", "mask", UNIT_NAME], check=True,
                       capture_output=True)
        run_imagefs("commit", mnt)
    before = sha(image)
    assert "masked" in refused("firstboot", "add", image, "1", "--command", "true")
    assert sha(image) == before


def test_symlinks_in_the_image_never_lead_writes_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lib/systemd").mkdir(parents=True)
    (root / "lib/systemd/systemd").write_bytes(b"")
    (root / "var/lib").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "var/lib/imagefs").symlink_to(f"../../../../../../../..{outside}")
    (root / "etc").symlink_to(outside / "etc")
    (root / "usr").symlink_to("/")
    with pytest.raises(firstboot.Refused, match="broken symlink"):  # they lead nowhere
        enqueue(str(root), "x", b"#!/bin/sh\ntrue\n")
    inside = root / outside.relative_to("/")  # where they lead in the image
    (inside / "etc").mkdir(parents=True)
    assert enqueue(str(root), "x", b"#!/bin/sh\ntrue\n") == "0001"
    assert not os.listdir(outside)
    assert (inside / "firstboot/queue/0001-x/run").is_file()
    assert (inside / "etc/systemd/system" / UNIT_NAME).is_file()
    assert (root / "lib/imagefs/firstboot").is_file()
    assert [i.name for i in list_items(MountRoot(str(root)))] == ["x"]
    with pytest.raises(firstboot.Refused):
        enqueue(str(root), "../x", b"true\n")


def test_in_a_mount_the_commit_is_the_callers(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    before = sha(image)
    with mounted_rw(image, 1, mnt):
        out = run_imagefs("firstboot", "add", "--mount", mnt, "--command", "true",
                          "--name", "keep").stdout.decode()
        assert f"commit it with: imagefs commit {mnt}" in out
        run_imagefs("firstboot", "add", "--mount", mnt, "--command", "true", "--name", "drop")
        run_imagefs("firstboot", "remove", "--mount", mnt, "drop")
        assert [i["name"] for i in items_of(mnt)] == ["keep"]
        assert sha(image) == before
        run_imagefs("commit", mnt)
    assert [(i["id"], i["name"]) for i in items_of(image, "1")] == [("0001", "keep")]
