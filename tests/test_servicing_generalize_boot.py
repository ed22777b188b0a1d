"""Generalize, proven by booting (issue 15, item 3).

A specialised bookworm-minbase index (tests/generalize_helpers.py: a machine ID, host keys
made by its own `ssh-keygen -A`, a hostname, logs and a journal, shell histories, ...) is
generalized as a new index; `--dry-run` listed exactly what the commit removed (`imagefs
diff`).  The generalized index is applied (`imagefs apply`) to two folders and each is
booted under `systemd-nspawn --boot` (as test_servicing_firstboot.py boots, in a mount and
pid namespace that dies with it, bounded by a timeout), a probe unit recording what the
booted system sees and powering it off.  Each boot makes its own machine ID, runs the
first-boot queue before ssh.service (new host keys, `sshd -t` passes), keeps every unit
as enabled or disabled as the image had it (systemd's first-boot presets held off), and
none of the removed files is back, but for those a boot makes anew (host keys, the random
seed), which differ from the old ones.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_imagefs
from generalize_helpers import MACHINE_ID, specialised_copy
from servicing_helpers import NEEDS_NSPAWN
from test_servicing_firstboot import BOOT_TIMEOUT, booting

from servicing.firstboot import list_items
from servicing.generalize_ops import PRESET
from servicing.roots import MountRoot

pytestmark = [NEEDS_NSPAWN]

PROBE = "/var/tmp/imagefs-generalize-probe"
PROBE_UNIT = f"""\
[Unit]
Description=imagefs test probe: what a generalized clone sees at its first boot
After=imagefs-firstboot.service ssh.service multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c '{{ echo "machine_id=$(cat /etc/machine-id)"; \
/usr/sbin/sshd -t; echo "sshd_t=$?"; echo "hostname=$(hostname)"; \
echo "firstboot=$(systemctl show imagefs-firstboot.service -p Result --value)"; \
echo "ssh=$(systemctl show ssh.service -p ActiveState --value)"; \
echo "failed=$(systemctl --failed --no-legend --plain | cut -d" " -f1 | tr "\\n" " ")"; \
}} > {PROBE} 2>&1; systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
"""
# What a boot makes anew where generalize removed the old ones.
MADE_AT_BOOT = re.compile(r"/etc/ssh/ssh_host_\w+_key(\.pub)?|/var/lib/systemd/random-seed\Z")


def enabled_units(root: Path) -> set[str]:
    out = subprocess.run(["systemctl", f"--root={root}", "list-unit-files",
                          "--state=enabled", "--no-legend", "--no-pager"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def boot(root: Path) -> dict[str, str]:
    units = root / "etc/systemd/system"
    (units / "imagefs-generalize-probe.service").write_text(PROBE_UNIT)
    (units / "multi-user.target.wants/imagefs-generalize-probe.service").symlink_to(
        "/etc/systemd/system/imagefs-generalize-probe.service")
    start = time.monotonic()
    with booting(root) as proc:
        try:
            out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the boot of {root} took longer than {BOOT_TIMEOUT} s")
    print(f"boot of {root.name}: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, out.decode(errors="replace")
    seen = (root / PROBE.lstrip("/")).read_text()
    return dict(line.split("=", 1) for line in seen.splitlines() if "=" in line)


def old_bytes(image: Path, path: str) -> bytes:
    return run_imagefs("cat", image, "specialised", path).stdout


def test_every_clone_boots_as_a_new_machine(tmp_path: Path) -> None:
    image = specialised_copy(tmp_path)
    dry = json.loads(run_imagefs("generalize", image, "1", "--dry-run", "--json",
                                 "--no-daemon").stdout)
    run_imagefs("generalize", image, "1", "--new-index", "generalized", "--no-daemon")
    removed = {a["path"] for op in dry["indices"][0]["plan"]["operations"]
               for a in op["actions"] if a["action"] == "remove"}
    d = json.loads(run_imagefs("diff", image, "1", "2", "--json").stdout)
    assert set(d["removed"]) == removed  # --dry-run listed exactly what was removed
    with in_memory(tmp_path / "clones") as where:
        clones = [where / "clone-a", where / "clone-b"]
        seen = {}
        for clone in clones:
            run_imagefs("apply", image, "generalized", clone)
            units = enabled_units(clone)
            seen[clone.name] = boot(clone)
            assert enabled_units(clone) - units == {"imagefs-generalize-probe.service"}
            assert units <= enabled_units(clone)
            _check_clone(image, clone, seen[clone.name], removed)
        ids = {s["machine_id"] for s in seen.values()}
        assert len(ids) == 2 and MACHINE_ID not in ids, seen
        keys = [(c / "etc/ssh/ssh_host_ed25519_key").read_bytes() for c in clones]
        assert keys[0] != keys[1]


@contextlib.contextmanager
def in_memory(where: Path) -> Iterator[Path]:
    """A tmpfs at where for the clones (an apply there takes a quarter of the time it
    takes on disk), unmounted at the end."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "imagefs-clones",
                    str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def _check_clone(image: Path, clone: Path, seen: dict[str, str], removed: set[str]) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", seen["machine_id"]), seen
    assert (clone / "etc/machine-id").read_text() == seen["machine_id"] + "\n"
    assert seen["sshd_t"] == "0" and seen["ssh"] == "active", seen
    assert seen["firstboot"] == "success" and seen["hostname"] == "localhost", seen
    # systemd-firstboot has no console to ask on in a container: it fails there only.
    assert set(seen["failed"].split()) <= {"systemd-firstboot.service"}, seen
    done = {i.name: i.state for i in list_items(MountRoot(str(clone)))}
    assert done == {"ssh-host-keys": "succeeded", "drop-first-boot-preset": "succeeded"}
    assert not (clone / PRESET.lstrip("/")).exists()
    assert len(list((clone / "etc/ssh").glob("ssh_host_*_key"))) == 3
    back = {p for p in removed if (clone / p.lstrip("/")).exists()
            or (clone / p.lstrip("/")).is_symlink()}
    assert all(MADE_AT_BOOT.fullmatch(p) for p in back), back
    for path in back:
        if (clone / path.lstrip("/")).is_file():
            assert (clone / path.lstrip("/")).read_bytes() != old_bytes(image, path), path
    assert (clone / "var/lib/dbus/machine-id").is_symlink()
    assert not (clone / f"var/log/journal/{MACHINE_ID}").exists()
    assert (clone / f"var/log/journal/{seen['machine_id']}").is_dir()
