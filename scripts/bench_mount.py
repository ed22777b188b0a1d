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
(same zstd level, LZX, mksquashfs -comp zstd), read once before the rows so they are in
the page cache; the page cache is not dropped, so "fresh" means a new mount (empty FUSE
caches), not a cold disk.

Beside them the kernel's own squashfs (`mount -t squashfs -o loop,ro` of the same .sqfs
file; column kernel-squashfs; skipped with a note where loop mounts are refused) and, after
the fresh read-all, the mount process's peak RSS (VmHWM of the process holding /dev/fuse,
MB; kernel squashfs has none).  Targets (issue 17): read-all fresh <= 1.2x and find -ls
fresh <= 2x the kernel's squashfs, peak RSS <= 64 MB.

Run inside scripts/bench (--no-mount skips these rows), or the read rows of one tree (no
wimmount, no dd) with scripts/bench_io.py's --only ro.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_daemon import daemon_child

from imagefs.mount.kernel import find_mount

BIG_SIZE = 1 << 30
RUNS = 2
DD_RUNS = 3
# wimlib = wimmount, squashfs = squashfuse_ll, kernel-squashfs = mount -t squashfs -o loop
PEERS = ("imagefs", "wimlib", "squashfs", "kernel-squashfs", "plain")
KSQUASH = "kernel-squashfs"
GROUPS = ("read", "dd")  # mount time, tar, find -ls, peak RSS | dd of the 1 GiB file
RSS_LIMIT_MB = 64


@contextmanager
def environment(work: Path, dirs: dict[str, str],
                other: dict[str, str] | None = None) -> Iterator[None]:
    """os.environ for the block: each variable of dirs set to work/VALUE (IMAGEFS_STATE_DIR,
    IMAGEFS_RUN_DIR: sessions and mount records under the work dir), each of other to
    VALUE; afterwards every one is as before (unset again if it was unset)."""
    new = {k: str(work / v) for k, v in dirs.items()} | (other or {})
    saved = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


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


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of pid in MB (10^6 bytes), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def loop_mount_refused(b: Any, image: str) -> str | None:
    """Why `mount -t squashfs -o loop,ro` of image is refused here, or None if it works."""
    probe = b.work / "mnt-probe"
    probe.mkdir(exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", image, str(probe)],
                              cwd=b.work, capture_output=True, text=True)
        if proc.returncode != 0:
            return (proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[-1]
        subprocess.run(["umount", str(probe)], capture_output=True)
        return None
    except OSError as e:
        return str(e)
    finally:
        if mounted(probe):
            subprocess.run(["umount", "-l", str(probe)], capture_output=True)
        probe.rmdir()


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
                KSQUASH: ["mount", "-t", "squashfs", "-o", "loop,ro", image, str(self.mnt)],
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
                KSQUASH: ["umount", str(self.mnt)],
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
                   timed: Callable[..., None], groups: frozenset[str] = frozenset(GROUPS),
                   peers: tuple[str, ...] = PEERS) -> None:
    """The mount rows of `groups` (see GROUPS) with the tools in `peers` (see PEERS), on the
    images bench.py made (SHORT.imagefs, .wim, .sqfs in the work dir)."""
    images = {short: {"imagefs": f"{short}.imagefs", "wimlib": f"{short}.wim",
                      "squashfs": f"{short}.sqfs", KSQUASH: f"{short}.sqfs"}
              for _n, short, _s in trees}
    big_src = b.work / "bigtree"
    try:
        if "dd" in groups:
            make_big_tree(big_src)
            images["big"] = {"imagefs": "big.imagefs", "wimlib": "big.wim",
                             "squashfs": "big.sqfs", KSQUASH: "big.sqfs"}
            b.run([imagefs, "capture", str(big_src), "big.imagefs", "--name", "big"]
                  + (["--level", str(b.level)] if b.level is not None else []))
            if "wimlib" in peers:
                b.run(["wimcapture", str(big_src), "big.wim", "big", "--unix-data",
                       "--compress=LZX"])
            if "squashfs" in peers or KSQUASH in peers:
                b.run(["mksquashfs", str(big_src), "big.sqfs", "-comp", "zstd", "-noappend",
                       "-quiet"])
        if KSQUASH in peers:
            why = loop_mount_refused(b, next(iter(images.values()))[KSQUASH])
            if why:
                b.note(f"{KSQUASH} column skipped: mount -t squashfs -o loop,ro is refused "
                       f"here ({why})")
                peers = tuple(p for p in peers if p != KSQUASH)
        # The image files in the page cache (a mount reads its image through it).
        for path in {images[s][t] for s in images for t in peers if t in images[s]}:
            with open(b.work / path, "rb", buffering=0) as fh:
                while fh.read(1 << 20):
                    pass
        with (daemon_child(imagefs, b.work, dict(os.environ)) as sock,
              environment(b.work, {}, {"IMAGEFS_SOCKET": str(sock)})):
            if "read" in groups:
                _read_rows(b, trees, imagefs, timed, images, peers)
            if "dd" in groups:
                _dd_rows(b, imagefs, timed, images["big"], big_src, peers)
    finally:
        shutil.rmtree(big_src, ignore_errors=True)


def _read_rows(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
               timed: Callable[..., None], images: dict[str, dict[str, str]],
               peers: tuple[str, ...]) -> None:
    def vs(*targets: tuple[str, float]) -> list[tuple[str, float]]:
        return [t for t in targets if t[0] in peers or t[0] == "abs"]

    mount_row = b.row("mount.time", "mount: command until the folder answers, daemon "
                      "listening (s)", "s", targets=[("abs", 0.2)])
    alone_row = b.row("mount.time.alone", "mount: the same, --no-daemon (s)", "s")
    for name, short, src in trees:
        p1 = b.row(f"mount.tar1.{name}", f"mount {name}: tar read-all, fresh (s)", "s",
                   targets=vs(("squashfs", 1.3), ("wimlib", 0.3), (KSQUASH, 1.2)))
        p2 = b.row(f"mount.tar2.{name}", f"mount {name}: tar read-all, again (s)", "s",
                   targets=vs(("squashfs", 1.5)))
        c1 = b.row(f"mount.cpu1.{name}", f"mount {name}: driver CPU, tar fresh (s)", "s")
        c2 = b.row(f"mount.cpu2.{name}", f"mount {name}: driver CPU, tar again (s)", "s")
        rss = b.row(f"mount.rss.{name}", f"mount {name}: mount process peak RSS after the "
                    "fresh read-all (MB)", "MB", targets=[("abs", RSS_LIMIT_MB)])
        f1 = b.row(f"mount.find1.{name}", f"mount {name}: find -ls, fresh (s)", "s",
                   targets=vs(("squashfs", 1.0), (KSQUASH, 2.0)))
        f2 = b.row(f"mount.find2.{name}", f"mount {name}: find -ls, again (s)", "s")
        for _run, tool in ((r, t) for r in range(RUNS) for t in peers):
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
                peak = peak_rss_mb(pid) if pid is not None else None
                timed(p2, tool, shell(b, tar))
                cpu2 = cpu_seconds(pid)
                if pid is not None:
                    timed(c1, tool, cpu1 - cpu0)
                    timed(c2, tool, cpu2 - cpu1)
                if peak is not None:  # the largest of the runs: a peak is a worst case
                    rss.samples.setdefault(tool, []).append({"MB": round(peak, 2)})
                    rss.values[tool] = max(s["MB"] for s in rss.samples[tool])
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


def _dd_rows(b: Any, imagefs: str, timed: Callable[..., None], images: dict[str, str],
             big_src: Path, peers: tuple[str, ...]) -> None:
    big = b.row("mount.dd", "mount: dd bs=1M of a 1 GiB file, fresh (MB/s)", "MB/s",
                targets=[("squashfs", 1.0)], higher_is_better=True)
    cpu = b.row("mount.dd.cpu", "mount: driver CPU for that dd (s)", "s")
    for _run, tool in ((r, t) for r in range(DD_RUNS) for t in peers):
        m = Mounter(b, tool, imagefs)
        mnt, _s, pid = m.mount(images.get(tool, ""), big_src)
        try:
            cpu0 = cpu_seconds(pid)
            seconds = shell(b, f"dd if={mnt}/big.bin of=/dev/null bs=1M status=none")
            timed(big, tool, BIG_SIZE / 1e6 / seconds)
            if pid is not None:
                timed(cpu, tool, cpu_seconds(pid) - cpu0)
        finally:
            m.unmount()
