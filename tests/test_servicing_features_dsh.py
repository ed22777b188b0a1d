"""servicing/feature_dsh.py keeps deb-systemd-helper's state exactly as the image's own
/usr/bin/deb-systemd-helper does: on a writable mount of bookworm-minbase, real and
crafted units (quoted values, lower-case keys, several aliases on a line, Also= chains and
cycles, DefaultInstance, a missing Also= unit), the real helper is run in the image's
container and its state files and answers are compared byte for byte with ours."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import mounted_rw
from servicing_helpers import NEEDS_DEBS, NEEDS_NSPAWN

from servicing.feature_dsh import (
    ENABLED,
    MASKED,
    Unreadable,
    forget_mask,
    state_path,
    update_state,
    was_enabled,
)
from servicing.roots import MountRoot
from servicing.runner import run

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

SERVICE = "[Unit]\nDescription=crafted\n[Service]\nExecStart=/bin/true\n"
CRAFTED = {
    "q.service": SERVICE + "[Install]\nWantedBy=\"multi-user.target\"\nAlias='q2.service'\n",
    "lower.service": SERVICE + "[install]\nwantedby=multi-user.target\nrequiredby=x.target\n",
    "two.service": SERVICE + "[Install]\nAlias=two-a.service two-b.service\n"
                             "WantedBy= multi-user.target  graphical.target \n",
    "chain.service": SERVICE + "[Install]\nAlso=link.service\nWantedBy=a.target\n",
    "link.service": SERVICE + "[Install]\nAlso=chain.service loop.service\n"
                              "RequiredBy=b.target\n",
    "loop.service": SERVICE + "[Install]\nAlso=link.service\nWantedBy=c.target\n",
    "tpl@.service": SERVICE + "[Install]\nWantedBy=d.target\nDefaultInstance='inst'\n",
    "unit-section.service": "[Unit]\nWantedBy=e.target\n# WantedBy=f.target\n",
    "crlf.service": SERVICE.replace("\n", "\r\n") + "[Install]\r\nWantedBy=g.target\r\n",
    "missing-also.service": SERVICE + "[Install]\nAlso=not-there.service\n",
}
REAL = ("ssh.service", "getty@.service", "systemd-networkd.service", "apt-daily.timer",
        "e2scrub_reap.service", "systemd-pstore.service", "networking.service")
# Runs the real helper on each unit: its state file (or "FAILED") and was-enabled.
SCRIPT = r"""
mkdir -p /root/real
for u in "$@"; do
  rm -f "/var/lib/systemd/deb-systemd-helper-enabled/$u.dsh-also"
  if deb-systemd-helper update-state "$u" 2>/dev/null; then
    cp "/var/lib/systemd/deb-systemd-helper-enabled/$u.dsh-also" "/root/real/$u"
  else
    echo FAILED > "/root/real/$u"
  fi
  if deb-systemd-helper --quiet was-enabled "$u"; then echo "$u yes"; else echo "$u no"; fi
done
"""


def real_helper(mnt: Path, units: list[str]) -> tuple[dict[str, bytes], dict[str, bool]]:
    out = run(mnt, ["sh", "-c", SCRIPT, "sh", *units],
              env={"DPKG_MAINTSCRIPT_PACKAGE": "imagefs-tests"})
    assert out.returncode == 0, out.stderr
    answers = dict(ln.split() for ln in out.stdout.decode().splitlines())
    files = {u: (mnt / "root/real" / u).read_bytes() for u in units}
    shutil.rmtree(mnt / "root/real")
    return files, {u: answers[u] == "yes" for u in units}


def ours(mnt: Path, units: list[str]) -> tuple[dict[str, bytes], dict[str, bool]]:
    root = MountRoot(str(mnt))
    files, answers = {}, {}
    for unit in units:
        (mnt / state_path(unit).lstrip("/")).unlink(missing_ok=True)
        try:
            update_state(root, unit)
            files[unit] = (mnt / state_path(unit).lstrip("/")).read_bytes()
        except Unreadable:
            files[unit] = b"FAILED\n"
        answers[unit] = was_enabled(root, unit)
    return files, answers


def compare(mnt: Path, units: list[str]) -> None:
    real = real_helper(mnt, units)
    mine = ours(mnt, units)
    assert mine[0] == real[0]
    assert mine[1] == real[1]


def test_update_state_and_was_enabled_as_the_real_helper(minbase_image: Path,
                                                         tmp_path: Path) -> None:
    image = tmp_path / "dsh.imagefs"
    shutil.copyfile(minbase_image, image)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        for name, text in CRAFTED.items():
            (mnt / "etc/systemd/system" / name).write_text(text)
        wants = mnt / "etc/systemd/system/a.target.wants"
        wants.mkdir()
        (wants / "chain.service").symlink_to("/etc/systemd/system/chain.service")
        compare(mnt, [*REAL, *CRAFTED])
        assert was_enabled(MountRoot(str(mnt)), "ssh.service")  # links present
        (mnt / "etc/systemd/system/sshd.service").unlink()
        compare(mnt, ["ssh.service"])  # one link gone: was-enabled says no, as it does


def test_forget_mask_as_unmask_leaves_the_state_directory(minbase_image: Path,
                                                          tmp_path: Path) -> None:
    image = tmp_path / "mask.imagefs"
    shutil.copyfile(minbase_image, image)
    mnt = tmp_path / "mnt"
    masked = mnt / MASKED.lstrip("/")
    with mounted_rw(image, 1, mnt):
        for unit in ("e2scrub_reap.service", "ssh.service"):
            (mnt / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (mnt / "etc/systemd/system" / unit).symlink_to("/dev/null")
        masked.mkdir()
        (masked / "e2scrub_reap.service").touch()
        (masked / "ssh.service").touch()
        out = run(mnt, ["deb-systemd-helper", "unmask", "e2scrub_reap.service"],
                  env={"DPKG_MAINTSCRIPT_PACKAGE": "imagefs-tests"})
        assert out.returncode == 0, out.stderr
        real = sorted(p.name for p in masked.iterdir())
        (masked / "e2scrub_reap.service").touch()
        assert forget_mask(MountRoot(str(mnt)), "e2scrub_reap.service")
        assert sorted(p.name for p in masked.iterdir()) == real == ["ssh.service"]
        assert forget_mask(MountRoot(str(mnt)), "ssh.service")
        assert not masked.exists()  # the empty directory goes, as the helper's does
        assert not forget_mask(MountRoot(str(mnt)), "ssh.service")
        assert (mnt / ENABLED.lstrip("/")).is_dir()


@pytest.mark.slow
def test_every_installable_unit_of_minbase(minbase_image: Path,
                                           tmp_path: Path) -> None:
    image = tmp_path / "all.imagefs"
    shutil.copyfile(minbase_image, image)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        lib = mnt / "usr/lib/systemd/system"
        units = sorted(p.name for p in lib.iterdir() if p.is_file() and not p.is_symlink()
                       and "[Install]" in p.read_text(errors="replace"))
        assert len(units) > 30
        compare(mnt, units)
