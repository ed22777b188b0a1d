"""Servicing benchmarks for scripts/bench (issue 14): adding packages to an index as one
imagefs transaction beside the same done by hand with wimlib, and listing packages.

On the bookworm-minbase tree, each run on a fresh copy of the image (imagefs) or the LZX WIM:
  * add hello: imagefs `package add IMAGE 1 hello.deb --no-daemon` (open a session, install
    with the image's dpkg in its container, check, commit) -> s, and the same through an
    imagefs daemon started (warm) beforehand, as it runs wherever imagefs.socket is
    enabled (its own row, beside the same wimlib runs); wimlib: `wimmountrw --unix-data`,
    copy the .deb in, `chroot MNT dpkg -i`, remove the copy, `wimunmount --commit`; plain:
    `wimapply` to a directory, `dpkg --root=DIR -i`, `wimcapture` a new WIM.
  * add jq with its dependencies: imagefs `package add IMAGE 1 jq.deb --repository DEBS`
    (libjq1 and libonig5 found there); wimlib and plain: dpkg -i of the three .debs.
  * the growth of the image (or WIM) by each, in bytes: target <= the packages' .deb sizes
    + 64 KiB for imagefs.
  * package list: imagefs `package list IMAGE 1` (from the image, no mount) beside
    `wimmount`, `dpkg-query --admindir=MNT/var/lib/dpkg -W`, `wimunmount` (wimlib) and the
    dpkg-query alone on a WIM mounted beforehand (plain); shown for scale, no target.
Targets: a transaction <= 0.5x the wimlib workflow's time.  Best of ADD_RUNS (3) for the
adds, RUNS for the listing, interleaved: one add's samples vary by ~10 % from run to run on
a 2-CPU VM, on both sides (hello: imagefs 0.29-0.35 s, wimlib 0.60-0.71 s), and the best
of two left the ratio to chance near the line.

Run inside scripts/bench (--no-servicing skips these rows) or alone:
  .venv/bin/python scripts/bench_servicing.py [--json PATH]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_mount import RUNS, environment, shell

DEBS = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "debs"
WIM_OPTS = ["--unix-data", "--compress=LZX"]
SLACK = 64 << 10  # the growth target's allowance over the packages' own size
PEERS = ("imagefs", "wimlib", "plain")
ADD_RUNS = 3  # samples of each add, by each tool (the best counts)
ENV = {"IMAGEFS_STATE_DIR": "svc-state", "IMAGEFS_RUN_DIR": "svc-run"}


def deb(name: str) -> Path:
    found = sorted(DEBS.glob(f"{name}_*.deb"))
    if not found:
        raise FileNotFoundError(f"{DEBS}/{name}_*.deb")
    return found[0]


def measure_servicing(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                      timed: Callable[..., None]) -> None:
    name, short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    try:
        with environment(b.work, ENV):
            _measure(b, name, short, src, imagefs, timed)
    finally:
        for mp in ("svc-mnt",):
            if os.path.ismount(b.work / mp):
                subprocess.run(["umount", "-l", str(b.work / mp)], capture_output=True)
        for d in ("svc-mnt", "svc-dir", "svc-state", "svc-run", "svc-debs"):
            shutil.rmtree(b.work / d, ignore_errors=True)
        for f in ("svc.imagefs", "svc.wim", "svc-new.wim"):
            (b.work / f).unlink(missing_ok=True)


def _measure(b: Any, name: str, short: str, src: Path, imagefs: str,
             timed: Callable[..., None]) -> None:
    image, wim = f"{short}.imagefs", f"{short}.wim"
    if not (b.work / image).exists():
        b.run([imagefs, "capture", str(src), image, "--name", name])
    if not (b.work / wim).exists():
        b.run(["wimcapture", str(src), wim, name, *WIM_OPTS])
    repo = b.work / "svc-debs"
    repo.mkdir(exist_ok=True)
    for n in ("jq", "libjq1", "libonig5"):
        shutil.copy(deb(n), repo)
    b.names.setdefault(str(repo), "DEBS")
    hello = [deb("hello")]
    jq = [deb(n) for n in ("jq", "libjq1", "libonig5")]
    with _daemon(b, imagefs):
        _add(b, "daemon", image, wim, imagefs, hello, hello, [])  # warm-up, not counted
        for label, key, debs, extra in (
                ("add hello", "hello", hello, []),
                ("add jq (+2 deps from --repository)", "jq", jq, ["--repository", str(repo)])):
            size = sum(d.stat().st_size for d in debs)
            t_row = b.row(f"svc.{key}", f"servicing: {label} (s)", "s", target=0.5)
            d_row = b.row(f"svc.{key}.daemon", f"servicing: {label}, through a daemon (s)",
                          "s", target=0.5)
            g_row = b.row(f"svc.{key}.growth",
                          f"servicing: {label}, growth (MiB; target: bytes)", "bytes",
                          targets=[("abs", size + SLACK)])
            for _run, tool in ((r, t) for r in range(ADD_RUNS) for t in (*PEERS, "daemon")):
                before, sample, after = _add(b, tool, image, wim, imagefs, debs[:1], debs,
                                             extra)
                if tool == "daemon":
                    timed(d_row, "imagefs", sample)
                    continue
                timed(t_row, tool, sample)
                if tool == "wimlib":  # the daemon's row is beside the same wimlib runs
                    timed(d_row, tool, sample)
                g_row.values[tool] = after - before
    _measure_list(b, image, wim, imagefs, timed)


@contextmanager
def _daemon(b: Any, imagefs: str) -> Iterator[None]:
    """An imagefs daemon of the bench's own (bench_daemon.daemon_child: its socket in the
    work dir, its sessions in svc-state, stopped by its pid): `package add` then goes
    through it (its fork server mounts the session), as it does wherever imagefs.socket is
    enabled.  One add, not counted, warms it (its first job imports the servicing
    modules)."""
    from bench_daemon import daemon_child

    with daemon_child(imagefs, b.work, dict(os.environ)) as sock:
        b.names.setdefault(str(sock), "SOCK")
        yield


def _add(b: Any, tool: str, image: str, wim: str, imagefs: str, first: list[Path],
         debs: list[Path], extra: list[str]) -> tuple[int, float, int]:
    """One add by tool on a fresh copy: (size before, seconds, size after).  imagefs runs
    without a daemon; daemon, imagefs through the bench's daemon (_daemon)."""
    if tool in ("imagefs", "daemon"):
        shutil.copyfile(b.work / image, b.work / "svc.imagefs")
        before = b.size("svc.imagefs")
        how = (["--daemon"] if tool == "daemon" else ["--no-daemon"])
        s = b.run([*(["env", f"IMAGEFS_SOCKET={b.work / 'daemon.sock'}"]
                     if tool == "daemon" else []),
                   imagefs, "package", "add", "svc.imagefs", "1", *map(str, first), *extra,
                   *how])
        return before, s.seconds, b.size("svc.imagefs")
    shutil.copyfile(b.work / wim, b.work / "svc.wim")
    before = b.size("svc.wim")
    names = " ".join(d.name for d in debs)
    copies = " ".join(str(d) for d in debs)
    if tool == "wimlib":
        (b.work / "svc-mnt").mkdir(exist_ok=True)
        inside = " ".join(f"/tmp/{n}" for n in names.split())
        seconds = shell(b, "wimmountrw svc.wim 1 svc-mnt --unix-data && "
                           f"cp {copies} svc-mnt/tmp/ && "
                           f"chroot svc-mnt dpkg -i {inside} >/dev/null; rc=$?; "
                           f"(cd svc-mnt/tmp && rm -f {names}); "
                           "wimunmount svc-mnt --commit >/dev/null; exit $rc")
        return before, seconds, b.size("svc.wim")
    shutil.rmtree(b.work / "svc-dir", ignore_errors=True)
    (b.work / "svc-new.wim").unlink(missing_ok=True)
    seconds = shell(b, "wimapply svc.wim 1 svc-dir --unix-data >/dev/null && "
                       f"dpkg --root=svc-dir -i {copies} >/dev/null && "
                       f"wimcapture svc-dir svc-new.wim added {' '.join(WIM_OPTS)} >/dev/null")
    return before, seconds, b.size("svc-new.wim")


def _measure_list(b: Any, image: str, wim: str, imagefs: str,
                  timed: Callable[..., None]) -> None:
    """package list: imagefs reads the image without mounting; wimlib = wimmount, then
    dpkg-query --admindir on the mount, then wimunmount; plain = dpkg-query alone on a WIM
    mounted beforehand.  No target: it is shown for scale."""
    row = b.row("svc.list", "servicing: package list (s)", "s")
    mnt = b.work / "svc-mnt"
    mnt.mkdir(exist_ok=True)
    query = "dpkg-query --admindir=svc-mnt/var/lib/dpkg -W >/dev/null"
    for _run in range(RUNS):
        timed(row, "imagefs", b.run([imagefs, "package", "list", image, "1"]))
        timed(row, "wimlib", shell(b, f"wimmount {wim} 1 svc-mnt --unix-data && {query}; "
                                      "rc=$?; wimunmount svc-mnt >/dev/null; exit $rc"))
    subprocess.run(["wimmount", str(b.work / wim), "1", str(mnt), "--unix-data"], check=True,
                   capture_output=True)
    try:
        for _run in range(RUNS):
            timed(row, "plain", shell(b, query))
    finally:
        subprocess.run(["wimunmount", str(mnt)], capture_output=True)


def main() -> int:
    """Run these rows alone, with bench.py's table."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    return bench.standalone(
        "bench_servicing.py", __doc__ or "",
        ("wimcapture", "wimmountrw", "wimunmount", "wimapply", "wimmount", "dpkg"),
        "imagefs servicing benchmark; wimlib = wimmountrw, chroot dpkg -i, wimunmount "
        "--commit; plain = wimapply, dpkg --root, wimcapture",
        measure_servicing)


if __name__ == "__main__":
    sys.exit(main())
