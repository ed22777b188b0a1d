"""`driver add --initramfs` and `driver remove --initramfs` (issue 15) on a real
initramfs-tools: Debian 12's initramfs-tools and what it needs are fetched once with the
host's `apt-get download` (the host is Debian 12 like the fixture; skipped where apt cannot
fetch), installed into the kernel image with `imagefs package add`, and the initramfs is
rebuilt in the image's container.  The oracle is `cpio -t` of the initramfs the image holds
after each step.  Slow (update-initramfs compresses some 50 MB each time)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import mounted, run_imagefs
from drivers_helpers import HARDWARE, KVER, NEEDS_KERNEL, REPOSITORY, image_copy

pytestmark = [pytest.mark.slow, NEEDS_KERNEL]

# initramfs-tools and the packages it needs that bookworm-minbase lacks
PACKAGES = ("initramfs-tools", "initramfs-tools-core", "klibc-utils", "libklibc", "cpio",
            "kmod", "udev", "linux-base", "busybox")
INITRD = f"boot/initrd.img-{KVER}"


def debs() -> list[Path]:
    cache = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagefs"
             / "debs" / "initramfs-tools")
    cache.mkdir(parents=True, exist_ok=True)
    if len(list(cache.glob("*.deb"))) < len(PACKAGES):
        got = subprocess.run(["apt-get", "download", *PACKAGES], cwd=cache,
                             capture_output=True, text=True)
        if got.returncode != 0:
            pytest.skip(f"apt-get download cannot fetch initramfs-tools: {got.stderr[-300:]}")
    return sorted(cache.glob("*.deb"))


def initramfs_members(image: Path, where: Path) -> set[str]:
    """The paths inside the index's initramfs of KVER (gzip or zstd), by cpio -t."""
    with mounted(image, 1, where / "mnt"):
        data = (where / "mnt" / INITRD).read_bytes()
    unpack = "zstd -dc" if data[:4] == b"\x28\xb5\x2f\xfd" else "gzip -dc"
    listed = subprocess.run(f"{unpack} | cpio -t --quiet", shell=True, input=data,
                            capture_output=True, check=True)
    return set(os.fsdecode(listed.stdout).splitlines())


def test_added_drivers_go_into_the_initramfs_and_leave_it_again(tmp_path: Path) -> None:
    image = image_copy(tmp_path)
    run_imagefs("package", "add", image, "1", *debs(), timeout=600)
    run_imagefs("driver", "add", image, "1", "--repository", REPOSITORY, "--hardware",
                HARDWARE / "nuc-13-pro.json", "--initramfs", timeout=900)
    members = initramfs_members(image, tmp_path)
    updates = f"usr/lib/modules/{KVER}/updates/imagefs"
    assert {f"{updates}/ifs_demo_nic.ko", f"{updates}/ifs_demo_core.ko",
            f"{updates}/ifs_demo_wifi.ko"} <= members, sorted(m for m in members if "ifs" in m)
    assert {"usr/lib/firmware/ifs-demo/nic-fw-1.bin",
            "usr/lib/firmware/ifs-demo/wifi-ucode-72.bin"} <= members
    assert f"usr/lib/modules/{KVER}/modules.dep" in members

    run_imagefs("driver", "remove", image, "1", "ifs_demo_wifi", "--initramfs", timeout=900)
    members = initramfs_members(image, tmp_path)
    assert f"{updates}/ifs_demo_wifi.ko" not in members
    assert "usr/lib/firmware/ifs-demo/wifi-ucode-72.bin" not in members
    assert f"{updates}/ifs_demo_nic.ko" in members
