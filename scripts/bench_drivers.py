"""Driver benchmarks for scripts/bench (issue 15): `driver check` and `driver add` as whole
imagefs transactions, with the image's growth, beside the same done by hand with wimlib.

On bookworm-minbase with Debian's cloud kernel put in (the kernel fixture's files and the
host's depmod, as its postinst would), captured as an imagefs image and an LZX WIM; each
change runs on a fresh copy:
  * check: imagefs `driver check IMAGE 1 --hardware nuc-13-pro.json latitude-5540.json
    qemu-vm.json --repository REPO` (read from the image, no mount: every device's module,
    its firmware, the repository's offers) -> s; wimlib: `wimmount`, `modprobe -d MNT -S
    KVER -R MODALIAS` for each device of the three inventories, `wimunmount` (the modules
    only: no firmware, no repository); plain: `wimapply` to a directory, the same
    modprobe loop.
  * add: imagefs `driver add IMAGE 1 --repository REPO --hardware nuc-13-pro.json` (plan,
    session, modules and firmware in, the image's depmod in its container, check, commit)
    -> s; wimlib: `wimmountrw --unix-data`, copy the three modules to updates/ and the two
    firmware files, `depmod -b MNT -C MNT/etc/depmod.d KVER`, `wimunmount --commit`;
    plain: `wimapply`, the same copies and depmod, `wimcapture` as a new WIM.
  * the growth of the image (or WIM) by the add, in bytes.
Targets (the issue's "wimlib workflow" is the plain copy: wimapply, the change, wimcapture):
check and add <= 0.5x plain's time; growth <= 0.5x wimmountrw's (depmod rewrites its
index files, ~1 MB, of which a commit stores the changed chunks).  Best of RUNS,
interleaved.

Run inside scripts/bench (the lead wires it) or alone:
  .venv/bin/python scripts/bench_drivers.py [--json PATH]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import RUNS, environment, shell

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
DRIVERS = FIXTURES / "drivers"
REPOSITORY = DRIVERS / "repository"
NUC = REPOSITORY / "Intel" / "NUC-13-Pro"
KERNEL_DEB = FIXTURES / "kernel" / "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
KVER = "6.1.0-57-cloud-amd64"
INVENTORIES = ("nuc-13-pro", "latitude-5540", "qemu-vm")
WIM_OPTS = ["--unix-data", "--compress=LZX"]
PEERS = ("imagefs", "wimlib", "plain")
ENV = {"IMAGEFS_STATE_DIR": "drv-state", "IMAGEFS_RUN_DIR": "drv-run"}
SBIN = "PATH=/usr/sbin:/sbin:$PATH"


def measure_drivers(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                    timed: Callable[..., None]) -> None:
    _name, _short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    try:
        with environment(b.work, ENV):
            _measure(b, src, imagefs, timed)
    finally:
        for mp in ("drv-mnt",):
            if os.path.ismount(b.work / mp):
                subprocess.run(["umount", "-l", str(b.work / mp)], capture_output=True)
        for d in ("drv-mnt", "drv-dir", "drv-applied", "drv-state", "drv-run", "drv-tree",
                  "drv-kernel"):
            shutil.rmtree(b.work / d, ignore_errors=True)
        for f in ("drv.imagefs", "drv-work.imagefs", "drv.wim", "drv-work.wim",
                  "drv-new.wim"):
            (b.work / f).unlink(missing_ok=True)


def kernel_tree(b: Any, src: Path) -> Path:
    """minbase (hard links) with the kernel's files and depmod's output."""
    kernel = b.work / "drv-kernel"
    (kernel / "usr/lib").mkdir(parents=True, exist_ok=True)
    if not (kernel / "lib").is_symlink():
        (kernel / "lib").symlink_to("usr/lib")
    subprocess.run(f"dpkg-deb --fsys-tarfile {KERNEL_DEB} | tar -x --keep-directory-symlink "
                   f"-C {kernel} && {SBIN} depmod -b {kernel} {KVER}", shell=True, check=True)
    tree = b.work / "drv-tree"
    subprocess.run(["cp", "-al", str(src), str(tree)], check=True)
    subprocess.run(["cp", "-al", str(kernel / "boot"), str(kernel / "usr"), f"{tree}/"],
                   check=True)
    return tree


def _measure(b: Any, src: Path, imagefs: str, timed: Callable[..., None]) -> None:
    tree = kernel_tree(b, src)
    b.names.setdefault(str(REPOSITORY), "REPO")
    b.names.setdefault(str(DRIVERS / "hardware"), "HW")
    b.run([imagefs, "capture", str(tree), "drv.imagefs", "--name", "kernel"]
          + (["--level", str(b.level)] if b.level is not None else []))
    b.run(["wimcapture", str(tree), "drv.wim", "kernel", *WIM_OPTS])
    _measure_check(b, imagefs, timed)
    t_row = b.row("drv.add", "drivers: driver add --hardware nuc (3 modules, 2 firmware) (s)",
                  "s", targets=[("plain", 0.5)])
    g_row = b.row("drv.add.growth", "drivers: driver add, growth (MiB)", "bytes",
                  targets=[("wimlib", 0.5)])
    for _run, tool in ((r, t) for r in range(RUNS) for t in PEERS):
        before, seconds, after = _add(b, tool, imagefs)
        timed(t_row, tool, seconds)
        g_row.values[tool] = after - before


def _modaliases() -> list[str]:
    return [a for n in INVENTORIES
            for a in json.loads((DRIVERS / "hardware" / f"{n}.json").read_text())["modaliases"]]


def _measure_check(b: Any, imagefs: str, timed: Callable[..., None]) -> None:
    row = b.row("drv.check", "drivers: driver check, 3 inventories (24 devices) (s)", "s",
                targets=[("plain", 0.5)])
    hw = " ".join(str(DRIVERS / "hardware" / f"{n}.json") for n in INVENTORIES)
    loop = ("for a in " + " ".join(f"'{a}'" for a in _modaliases()) + "; do "
            f"{SBIN} modprobe -d {{root}} -S {KVER} -R \"$a\" || true; done >/dev/null")
    (b.work / "drv-mnt").mkdir(exist_ok=True)
    for _run in range(RUNS):
        timed(row, "imagefs", shell(b, f"{imagefs} driver check drv.imagefs 1 --hardware {hw} "
                                       f"--repository {REPOSITORY} --no-daemon >/dev/null; "
                                       "[ $? -le 1 ]"))
        timed(row, "wimlib", shell(b, "wimmount drv.wim 1 drv-mnt --unix-data && "
                                      + loop.format(root="drv-mnt")
                                      + "; rc=$?; wimunmount drv-mnt >/dev/null; exit $rc"))
        shutil.rmtree(b.work / "drv-dir", ignore_errors=True)
        timed(row, "plain", shell(b, "wimapply drv.wim 1 drv-dir --unix-data >/dev/null && "
                                     + loop.format(root="drv-dir")))


def _copies(root: str) -> str:
    """The shell commands that put the NUC's modules and firmware into root, then depmod."""
    mods = " ".join(str(NUC / f"{m}.ko") for m in ("ifs_demo_nic", "ifs_demo_core",
                                                   "ifs_demo_wifi"))
    return (f"mkdir -p {root}/lib/modules/{KVER}/updates/imagefs {root}/lib/firmware && "
            f"cp {mods} {root}/lib/modules/{KVER}/updates/imagefs/ && "
            f"cp -r {NUC}/firmware/ifs-demo {root}/lib/firmware/ && "
            f"{SBIN} depmod -b {root} -C {root}/etc/depmod.d {KVER}")


def _add(b: Any, tool: str, imagefs: str) -> tuple[int, float, int]:
    """One add by tool on a fresh copy: (size before, seconds, size after)."""
    if tool == "imagefs":
        shutil.copyfile(b.work / "drv.imagefs", b.work / "drv-work.imagefs")
        before = b.size("drv-work.imagefs")
        s = b.run([imagefs, "driver", "add", "drv-work.imagefs", "1", "--repository",
                   str(REPOSITORY), "--hardware", str(DRIVERS / "hardware/nuc-13-pro.json"),
                   "--no-daemon"])
        return before, s.seconds, b.size("drv-work.imagefs")
    shutil.copyfile(b.work / "drv.wim", b.work / "drv-work.wim")
    before = b.size("drv-work.wim")
    if tool == "wimlib":
        seconds = shell(b, "wimmountrw drv-work.wim 1 drv-mnt --unix-data && "
                           f"{_copies('drv-mnt')}; rc=$?; "
                           "wimunmount drv-mnt --commit >/dev/null; exit $rc")
        return before, seconds, b.size("drv-work.wim")
    shutil.rmtree(b.work / "drv-dir", ignore_errors=True)
    (b.work / "drv-new.wim").unlink(missing_ok=True)
    seconds = shell(b, "wimapply drv-work.wim 1 drv-dir --unix-data >/dev/null && "
                       f"{_copies('drv-dir')} && "
                       f"wimcapture drv-dir drv-new.wim added {' '.join(WIM_OPTS)} >/dev/null")
    return before, seconds, b.size("drv-new.wim")


def main() -> int:
    """Run these rows alone, with bench.py's table."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    return bench.standalone(
        "bench_drivers.py", __doc__ or "",
        ("wimcapture", "wimmountrw", "wimunmount", "wimapply", "wimmount", "dpkg-deb"),
        "imagefs driver benchmark; wimlib = wimmount(rw), modprobe -R / copies + depmod, "
        "wimunmount; plain = wimapply, the same, wimcapture",
        measure_drivers)


if __name__ == "__main__":
    sys.exit(main())
