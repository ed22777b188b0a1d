"""Issue 17's I/O workloads for scripts/bench: fio, dbench and small files on `imagefs mount
--rw` of bookworm-web beside fuse-overlayfs and the plain directory.

Each run on its own fresh writable mount (scripts/bench_rw.py's RwMount): imagefs, a session
on index 1 of the tree's image, dropped with `unmount --discard` after the run; fuse-overlayfs,
lowerdir = the extracted tree, new upperdir and workdir, and (as root) allow_other,
default_permissions, the options imagefs mounts with as root; plain, a copy of the tree on the
work dir's disk (`cp -a`, once; each run's files removed after it).  The workloads run in
MNT/io:
  * fio 4 KiB random read/write 50/50 (rw=randrw, one job, psync, buffered) for SECONDS s
    (time_based) on a 256 MiB file laid out beforehand by fio (untimed), with
    verify=crc32c, verify_backlog=1024, verify_fatal=1: fio skips its end-of-job verify in
    a time_based job, so the backlog verifies every written block during the run; fio
    counts those verify reads as reads (read IOPS ~ 2x write IOPS).  Rows: read IOPS,
    write IOPS, as fio reports them.
  * dbench 4 clients for SECONDS s, loadfile /usr/share/dbench/client.txt, -D MNT/io/dbench:
    its "Throughput" (MB/s).
  * scripts/smallfiles MNT/io/small: 2 rounds x 2 000 files of 4 KiB, each created, stat'ed,
    renamed, unlinked; creates/s in the table, the other rates in the JSON.
  * fio sequential write of a new 256 MiB file, bs=1M, end_fsync=1 (the fsync is inside
    fio's runtime): MiB/s as fio reports it.
fio runs with --fallocate=none (the file is written, not preallocated).  Each measurement is
the best of RUNS, the tools interleaved.  Targets (issue 17), all higher-is-better, the ratio
is imagefs / fuse-overlayfs: >= 1.0x for each row.
IMAGEFS_BENCH_IO_SECONDS shortens the 20 s fio randrw and dbench runs (e.g. 3 while trying).

Run inside scripts/bench (--no-io skips these rows; the tree is bookworm-web, minbase with
--quick) or alone, with the read-only rows of issue 17 for the same tree (scripts/bench_mount.py's
mount time, tar read-all, find -ls and peak RSS beside squashfuse_ll, the kernel's squashfs
and the plain directory; no wimmount, no dd) in the same table:
  .venv/bin/python scripts/bench_io.py [--only randrw,dbench,smallfiles,seqwrite,ro]
                                       [--tree bookworm-web] [--json PATH]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import KSQUASH, RUNS, environment, measure_mounts
from bench_rw import OVERLAY, RwMount, detach_leftovers

SMALLFILES = Path(__file__).resolve().parent / "smallfiles"
DBENCH_LOADFILE = "/usr/share/dbench/client.txt"
DBENCH_CLIENTS = 4
SECONDS = int(os.environ.get("IMAGEFS_BENCH_IO_SECONDS") or 20)
FIO_MIB = 256
PEERS = ("imagefs", OVERLAY, "plain")
# imagefs mounts as root with allow_other,default_permissions; fuse-overlayfs gets the same.
OVERLAY_OPTS = "allow_other,default_permissions" if os.geteuid() == 0 else "default_permissions"
ENV = {"IMAGEFS_STATE_DIR": "io-state", "IMAGEFS_RUN_DIR": "io-run"}
GROUPS = ("randrw", "dbench", "smallfiles", "seqwrite")
RO_PEERS = ("imagefs", "squashfs", KSQUASH, "plain")  # the read-only rows run alone
FIO = ["fio", "--ioengine=psync", "--numjobs=1", "--fallocate=none", "--verify_state_save=0"]


def fio_json(output: str) -> dict[str, Any]:
    """The first job of fio's --output-format=json (fio may print notes around it)."""
    doc = json.loads(output[output.index("{"):output.rindex("}") + 1])
    job = doc["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio: job error {job['error']}")
    return job


def measure_io(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
               timed: Callable[..., None], only: frozenset[str] = frozenset(GROUPS)) -> None:
    """The writable I/O rows of `only` (see GROUPS) on bookworm-web (else the first tree)."""
    name, short, src = next((t for t in trees if t[0] == "bookworm-web"), trees[0])
    try:
        with environment(b.work, ENV):
            _measure(b, name, short, src, imagefs, timed, only)
    finally:
        detach_leftovers(b.work, "bench_io")
        for d in ("io-state", "io-run", "io-plain", "ovl"):
            shutil.rmtree(b.work / d, ignore_errors=True)


def _measure(b: Any, name: str, short: str, src: Path, imagefs: str,
             timed: Callable[..., None], only: frozenset[str]) -> None:
    image = f"{short}.imagefs"
    if not (b.work / image).exists():
        b.run([imagefs, "capture", str(src), image, "--name", name]
              + (["--level", str(b.level)] if b.level is not None else []))
    b.names.setdefault(str(src), short)
    plain = b.work / "io-plain"
    b.run(["cp", "-a", str(src), plain.name])

    def each_run(workload: Callable[[str, Path], None]) -> None:
        for _run, tool in ((r, t) for r in range(RUNS) for t in PEERS):
            m = RwMount(b, tool, imagefs, src, OVERLAY_OPTS, plain)
            try:
                io = m.open(image) / "io"
                (b.work / io).mkdir()
                try:
                    workload(tool, io)
                finally:
                    if tool == "plain":
                        shutil.rmtree(b.work / io, ignore_errors=True)
            finally:
                m.close()

    def row(key: str, label: str, unit: str) -> Any:
        return b.row(f"io.{key}.{name}", f"rw io {short}: {label}", unit,
                     targets=[(OVERLAY, 1.0)], higher_is_better=True)

    if "randrw" in only:
        reads = row("fio.randrw.read", f"fio 4K randrw {FIO_MIB}M {SECONDS}s verify, read "
                    "(IOPS)", "IOPS")
        writes = row("fio.randrw.write", "the same, write (IOPS)", "IOPS")

        def randrw(tool: str, io: Path) -> None:
            target = [f"--filename={io}/fio.randrw", f"--size={FIO_MIB}M"]
            b.run([*FIO, "--name=layout", *target, "--create_only=1"])
            job = fio_json(b.run([
                *FIO, "--name=randrw", *target, "--rw=randrw", "--rwmixread=50", "--bs=4k",
                f"--runtime={SECONDS}", "--time_based", "--verify=crc32c",
                "--verify_backlog=1024", "--verify_fatal=1", "--output-format=json"]).output)
            timed(reads, tool, job["read"]["iops"])
            timed(writes, tool, job["write"]["iops"])
        each_run(randrw)

    if "dbench" in only:
        db = row("dbench", f"dbench {DBENCH_CLIENTS} clients {SECONDS}s (MB/s)", "MB/s")

        def dbench(tool: str, io: Path) -> None:
            (b.work / io / "dbench").mkdir()
            out = b.run(["dbench", "-c", DBENCH_LOADFILE, "-D", str(io / "dbench"),
                         "-t", str(SECONDS), str(DBENCH_CLIENTS)]).output
            found = re.search(r"^Throughput ([0-9.]+) MB/sec", out, re.M)
            if not found:
                raise RuntimeError(f"dbench printed no Throughput line:\n{out[-2000:]}")
            timed(db, tool, float(found.group(1)))
        each_run(dbench)

    if "smallfiles" in only:
        creates = row("smallfiles", "smallfiles 2x2000 4K (creates/s)", "files/s")
        others = {p: b.row(f"io.smallfiles.{p}.{name}", f"rw io {short}: smallfiles ({p}s/s)",
                           "files/s", higher_is_better=True, in_table=False)
                  for p in ("stat", "rename", "unlink")}

        def smallfiles(tool: str, io: Path) -> None:
            (b.work / io / "small").mkdir()
            out = b.run([sys.executable, str(SMALLFILES), str(io / "small"), "--json"]).output
            rates = json.loads(out)["per_second"]
            timed(creates, tool, rates["create"])
            for p, r in others.items():
                timed(r, tool, rates[p])
        each_run(smallfiles)

    if "seqwrite" in only:
        seq = row("fio.seqwrite", f"fio seq write {FIO_MIB}M bs=1M end_fsync (MiB/s)",
                  "MiB/s")

        def seqwrite(tool: str, io: Path) -> None:
            job = fio_json(b.run([
                *FIO, "--name=seqwrite", f"--filename={io}/fio.seq", f"--size={FIO_MIB}M",
                "--rw=write", "--bs=1M", "--end_fsync=1", "--output-format=json"]).output)
            timed(seq, tool, job["write"]["bw_bytes"] / (1 << 20))
        each_run(seqwrite)


def main() -> int:
    """Issue 17's rows alone on one tree (bookworm-web), in one table."""
    import argparse

    import bench  # not at the top: bench.py imports this module

    ap = argparse.ArgumentParser(prog="scripts/bench_io.py", description=__doc__.split("\n")[0])
    ap.add_argument("--only", metavar="GROUPS", default=",".join((*GROUPS, "ro")),
                    help=f"comma-separated groups of rows (of {','.join(GROUPS)},ro; ro: the "
                         "read-only mount rows)")
    ap.add_argument("--tree", default="bookworm-web", choices=[t for t, _s in bench.TREES])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = ap.parse_args()
    only = frozenset(g for g in args.only.split(",") if g)
    if not only or only - {*GROUPS, "ro"}:
        ap.error(f"--only: groups are {', '.join(GROUPS)}, ro")
    imagefs = str(bench.IMAGEFS)

    def measure(b: Any, trees: list[tuple[str, str, Path]]) -> None:
        if only & set(GROUPS):
            measure_io(b, trees, imagefs, bench.timed, only)
        if "ro" in only:
            name, short, src = trees[0]
            if not (b.work / f"{short}.imagefs").exists():
                b.run([imagefs, "capture", str(src), f"{short}.imagefs", "--name", name])
            b.run(["mksquashfs", str(src), f"{short}.sqfs", "-comp", "zstd", "-noappend",
                   "-quiet"])
            measure_mounts(b, trees, imagefs, bench.timed, frozenset({"read"}), RO_PEERS)

    tools = (*(("fio", "dbench", "fuse-overlayfs") if only & set(GROUPS) else ()),
             *(("squashfuse_ll", "mksquashfs") if "ro" in only else ()), "fusermount3")
    return bench.run_alone(
        "bench-io", tools,
        f"imagefs issue 17 benchmark ({args.tree}): rw io rows beside fuse-overlayfs "
        f"(-o {OVERLAY_OPTS}) and plain = a copy of the tree on local disk; read-only rows: "
        "squashfs = squashfuse_ll, kernel-squashfs = mount -t squashfs -o loop,ro, plain = "
        f"the extracted tree; fio randrw and dbench {SECONDS} s",
        measure, None, args.json, args.tree)


if __name__ == "__main__":
    sys.exit(main())
