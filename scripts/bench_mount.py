"""Mount benchmarks for scripts/bench: imagefs mount beside squashfuse_ll (squashfs zstd),
wimmount (wimlib LZX) and the plain directory.

For each fixture tree, on a fresh mount: read-all `tar -cf - -C MNT . | cat >/dev/null`
(pass 1), the same again on that mount (pass 2); on another fresh mount `find MNT -ls
>/dev/null` (fresh, then again); and on a fresh mount of a tree holding one 1 GiB
semi-compressible file, `dd if=MNT/big.bin of=/dev/null bs=1M`.  Mount time is from the
mount command's start until a listing of the mount point answers; imagefs's is measured
twice, with an `imagefs daemon` listening (as with the systemd units in contrib/: the
mount is forked from the daemon's warm fork server) and with `--no-daemon` (the command
itself imports pyfuse3 and trio and forks the mount).  Every other imagefs row uses
mounts made through that daemon (the mount process serves the same either way).  The mount
process's CPU seconds (utime + stime from /proc/PID/stat) are recorded for each pass.  Each
measurement is the best of RUNS (of DD_RUNS for dd), every run on its own fresh mount, the
tools interleaved: on 2 cores, where the kernel places the driver and the reader varies a
run's time by up to 2x for every driver.  The image files are the ones bench.py captured
(same zstd level, LZX, mksquashfs -comp zstd); the page cache is not dropped, so "fresh"
means a new mount (empty FUSE caches), not a cold disk.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_daemon import daemon_child

from imagefs.mount.kernel import find_mount

BIG_SIZE = 1 << 30
RUNS = 2
DD_RUNS = 3
PEERS = ("imagefs", "wimlib", "squashfs", "plain")  # wimlib = wimmount, squashfs = squashfuse_ll


def make_big_tree(root: Path) -> Path:
    """One 1 GiB file, about half compressible: per MiB, 512 KiB random and 512 KiB of
    repeated text."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    text = b"".join(b"line %06d of a log that repeats itself, more or less\n" % i
                    for i in range(9000))[: 512 * 1024]
    with open(root / "big.bin", "wb") as fh:
        for _ in range(BIG_SIZE // (1 << 20)):
            fh.write(rng.randbytes(512 * 1024))
            fh.write(text)
    return root


def mount_pid(mnt: Path) -> int | None:
    """The process serving mnt: the one whose command line names it and that holds
    /dev/fuse open (imagefs's guardian process has the same command line, not the fd)."""
    needle = os.fsencode(str(mnt))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                # (imagefs's title, from setproctitle, is one string of words)
                if needle not in fh.read().replace(b"\0", b" ").split():
                    continue
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse":
                    return int(entry)
            except OSError:
                pass
    return None


def mounted(path: Path) -> bool:
    return find_mount(str(path)) is not None


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


class Mounter:
    """Mount and unmount one kind of image at work/mnt; the plain directory needs none."""

    def __init__(self, b: Any, tool: str, imagefs: str, *extra: str) -> None:
        self.b = b
        self.tool = tool
        self.imagefs = imagefs
        self.extra = list(extra)  # more arguments of `imagefs mount`
        self.mnt = b.work / "mnt"

    def mount(self, image: str, plain: Path) -> tuple[Path, float, int | None]:
        if self.tool == "plain":
            return plain, 0.0, None
        self.mnt.mkdir(exist_ok=True)
        argv = {"imagefs": [self.imagefs, "mount", image, "1", str(self.mnt), *self.extra],
                "squashfs": ["squashfuse_ll", image, str(self.mnt)],
                "wimlib": ["wimmount", image, "1", str(self.mnt), "--unix-data"]}[self.tool]
        start = time.perf_counter()
        self.b.run(argv)
        while not os.listdir(self.mnt):
            time.sleep(0.001)
        seconds = time.perf_counter() - start
        return self.mnt, seconds, mount_pid(self.mnt)

    def unmount(self) -> None:
        if self.tool == "plain":
            return
        argv = {"imagefs": [self.imagefs, "unmount", str(self.mnt)],
                "squashfs": ["fusermount3", "-u", str(self.mnt)],
                "wimlib": ["wimunmount", str(self.mnt)]}[self.tool]
        for _ in range(50):
            if subprocess.run(argv, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        # wimunmount returns before its daemon has let go of the mount: wait until the
        # kernel no longer lists it, so the next mount finds a plain directory.
        deadline = time.monotonic() + 20
        while mounted(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        if mounted(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def shell(b: Any, command: str) -> float:
    return b.run(["sh", "-c", command]).seconds


def measure_mounts(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                   timed: Callable[..., None]) -> None:
    images = {short: {"imagefs": f"{short}.imagefs", "wimlib": f"{short}.wim",
                      "squashfs": f"{short}.sqfs"} for _n, short, _s in trees}
    big_src = make_big_tree(b.work / "bigtree")
    b.run([imagefs, "capture", str(big_src), "big.imagefs", "--name", "big"]
          + (["--level", str(b.level)] if b.level is not None else []))
    b.run(["wimcapture", str(big_src), "big.wim", "big", "--unix-data", "--compress=LZX"])
    b.run(["mksquashfs", str(big_src), "big.sqfs", "-comp", "zstd", "-noappend", "-quiet"])
    images["big"] = {"imagefs": "big.imagefs", "wimlib": "big.wim", "squashfs": "big.sqfs"}

    with daemon_child(imagefs, b.work, dict(os.environ)) as sock:
        os.environ["IMAGEFS_SOCKET"] = str(sock)
        try:
            _measure_mounts(b, trees, imagefs, timed, images, big_src)
        finally:
            del os.environ["IMAGEFS_SOCKET"]
    shutil.rmtree(big_src, ignore_errors=True)


def _measure_mounts(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                    timed: Callable[..., None], images: dict[str, dict[str, str]],
                    big_src: Path) -> None:
    mount_row = b.row("mount.time", "mount: command until the folder answers, daemon "
                      "listening (s)", "s", targets=[("abs", 0.2)])
    alone_row = b.row("mount.time.alone", "mount: the same, --no-daemon (s)", "s")
    for name, short, src in trees:
        p1 = b.row(f"mount.tar1.{name}", f"mount {name}: tar read-all, fresh (s)", "s",
                   targets=[("squashfs", 1.3), ("wimlib", 0.3)])
        p2 = b.row(f"mount.tar2.{name}", f"mount {name}: tar read-all, again (s)", "s",
                   targets=[("squashfs", 1.5)])
        c1 = b.row(f"mount.cpu1.{name}", f"mount {name}: driver CPU, tar fresh (s)", "s")
        c2 = b.row(f"mount.cpu2.{name}", f"mount {name}: driver CPU, tar again (s)", "s")
        f1 = b.row(f"mount.find1.{name}", f"mount {name}: find -ls, fresh (s)", "s",
                   targets=[("squashfs", 1.0)])
        f2 = b.row(f"mount.find2.{name}", f"mount {name}: find -ls, again (s)", "s")
        for _run, tool in ((r, t) for r in range(RUNS) for t in PEERS):
            m = Mounter(b, tool, imagefs)
            image = images[short].get(tool, "")
            mnt, seconds, pid = m.mount(image, src)
            try:
                if tool != "plain":
                    timed(mount_row, tool, seconds)
                tar = f"tar -cf - -C {mnt} . | cat >/dev/null"
                cpu0 = cpu_seconds(pid)
                timed(p1, tool, shell(b, tar))
                cpu1 = cpu_seconds(pid)
                timed(p2, tool, shell(b, tar))
                cpu2 = cpu_seconds(pid)
                if pid is not None:
                    timed(c1, tool, cpu1 - cpu0)
                    timed(c2, tool, cpu2 - cpu1)
            finally:
                m.unmount()
            mnt, _s, pid = m.mount(image, src)
            try:
                timed(f1, tool, shell(b, f"find {mnt} -ls >/dev/null"))
                timed(f2, tool, shell(b, f"find {mnt} -ls >/dev/null"))
            finally:
                m.unmount()
            if tool == "imagefs":
                alone = Mounter(b, tool, imagefs, "--no-daemon")
                _mnt, seconds, _pid = alone.mount(image, src)
                alone.unmount()
                timed(alone_row, tool, seconds)

    big = b.row("mount.dd", "mount: dd bs=1M of a 1 GiB file, fresh (MB/s)", "MB/s",
                targets=[("squashfs", 1.0)], higher_is_better=True)
    cpu = b.row("mount.dd.cpu", "mount: driver CPU for that dd (s)", "s")
    for _run, tool in ((r, t) for r in range(DD_RUNS) for t in PEERS):
        m = Mounter(b, tool, imagefs)
        mnt, _s, pid = m.mount(images["big"].get(tool, ""), big_src)
        try:
            cpu0 = cpu_seconds(pid)
            seconds = shell(b, f"dd if={mnt}/big.bin of=/dev/null bs=1M status=none")
            timed(big, tool, BIG_SIZE / 1e6 / seconds)
            if pid is not None:
                timed(cpu, tool, cpu_seconds(pid) - cpu0)
        finally:
            m.unmount()
