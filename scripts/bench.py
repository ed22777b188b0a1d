"""Benchmark imagefs against wimlib (LZX) and squashfs (zstd); run through scripts/bench.

One run measures, on the fixture trees bookworm-minbase and bookworm-web:
  * capture time and image size of each tree alone (imagefs, wimcapture, mksquashfs);
  * the two trees in one file: time of the second capture (imagefs capture onto the file
    vs wimappend) and the file's total size;
  * apply time of index 2 into an empty dir (imagefs apply vs wimapply), best of two runs
    each, interleaved, the destination removed between runs (the page cache is not dropped);
  * verify time of the two-index file (imagefs verify vs wimverify);
  * export time (and size) of index 2 (imagefs export vs wimexport).
Then the export and optimize rows (scripts/bench_export.py; --no-export skips them): export
of index 2 (time, peak RSS) beside wimexport, delete + optimize beside wimoptimize, and the
most compact two-index file beside wimoptimize --solid and tar | zstd -19 --long=27.
With --quick only bookworm-minbase is used: no two-index rows, and apply/verify/export run on
its one-index files (index 1).  Then the mount rows (scripts/bench_mount.py: imagefs mount
beside squashfuse_ll, wimmount and the plain directory; --no-mount skips them): in those
rows the wimlib column is wimmount and the squashfs column is squashfuse_ll.

Each command is timed with time.perf_counter around subprocess.run (output captured, exit
status checked); before each, the source trees are already in the page cache (read once up
front) and os.sync() has flushed the previous step's writes, both outside the timing.
Targets: size <= 1.0x wimlib LZX (each tree alone and both together), capture time <= 1.0x
wimcapture (each tree alone), apply time <= 1.5x wimapply; for mounts: tar pass 1 <= 1.3x
squashfuse_ll and <= 0.3x wimmount, pass 2 <= 1.5x squashfuse_ll, find -ls fresh <= 1.0x
squashfuse_ll, dd throughput >= 1.0x squashfuse_ll, mount time <= 0.2 s.  A missed target
is reported as FAIL and still exits 0; a failing command exits 1.
The mount rows also have the kernel's squashfs (column kernel-squashfs: `mount -t squashfs
-o loop,ro` of the same .sqfs; read-all fresh <= 1.2x it, find -ls fresh <= 2x) and the mount
process's peak RSS after the fresh read-all (<= 64 MB).
Then the writable-mount rows (scripts/bench_rw.py; --no-rw skips them): imagefs mount --rw
beside fuse-overlayfs and the plain directory, and imagefs commit beside wimunmount --commit;
and issue 17's I/O workloads on a writable mount of bookworm-web (scripts/bench_io.py; --no-io
skips them): fio 4 KiB randrw with verify, dbench, scripts/smallfiles, fio sequential write,
beside fuse-overlayfs with the same mount options and a copy of the tree on local disk.
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import resource
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_daemon import measure_daemon
from bench_drivers import measure_drivers
from bench_export import measure_export
from bench_features import measure_features
from bench_generalize import measure_generalize
from bench_io import measure_io
from bench_mount import measure_mounts
from bench_rw import measure_rw
from bench_servicing import measure_servicing
from bench_store import measure_store

REPO = Path(__file__).resolve().parent.parent
IMAGEFS = REPO / ".venv" / "bin" / "imagefs"
TREES = [("bookworm-minbase", "minbase"), ("bookworm-web", "web")]
WIM_OPTS = ["--unix-data", "--compress=LZX"]
MIB = 1024 * 1024


class CommandFailed(Exception):
    pass


@dataclass
class Sample:
    seconds: float
    cpu_seconds: float  # user + system time of the command and its children
    output: str = field(default="", repr=False)  # the command's stdout


TOOLS = ("imagefs", "wimlib", "squashfs", "kernel-squashfs", "fuse-overlayfs", "plain",
         "s3-copy", "rsync")
PEERS = ("wimlib", "squashfs", "kernel-squashfs", "fuse-overlayfs")  # the ratio columns


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "s", "ms", "bytes", "MB" (10^6 B), or a rate: "MB/s", "MiB/s", "IOPS", "/s"
    values: dict[str, float | None] = field(default_factory=dict)  # tool -> value
    samples: dict[str, list[dict]] = field(default_factory=dict)  # tool -> all timed runs
    # (peer, limit): imagefs/peer ratio at most limit (at least, if higher_is_better);
    # peer "abs": imagefs's own value at most limit.
    targets: list[tuple[str, float]] = field(default_factory=list)
    higher_is_better: bool = False
    in_table: bool = True  # False: only in the JSON

    def ratio_to(self, peer: str) -> float | None:
        a, b = self.values.get("imagefs"), self.values.get(peer)
        return a / b if a is not None and b else None

    @property
    def ratio(self) -> float | None:
        return self.ratio_to("wimlib")

    @property
    def passed(self) -> bool | None:
        results = []
        for peer, limit in self.targets:
            if peer == "abs":
                v = self.values.get("imagefs")
                results.append(None if v is None else v <= limit)
                continue
            r = self.ratio_to(peer)
            results.append(None if r is None else
                           (r >= limit if self.higher_is_better else r <= limit))
        if not results or None in results:
            return None
        return all(results)

    def target_text(self) -> str:
        parts = []
        for peer, limit in self.targets:
            if peer == "abs":
                parts.append(f"<= {limit:g}")
            else:
                parts.append(f"{'>=' if self.higher_is_better else '<='} {limit:g}x {peer}")
        return ", ".join(parts) or "-"


class Bench:
    def __init__(self, work: Path, names: dict[str, str], level: int | None):
        self.work = work
        self.names = names  # absolute path -> shell variable shown in the printed commands
        self.level = level
        self.commands: list[str] = []
        self.rows: list[Row] = []
        self.notes: list[str] = []  # printed under the table (e.g. a column skipped, and why)

    def note(self, text: str) -> None:
        print(f"  note: {text}", file=sys.stderr)
        self.notes.append(text)

    def show(self, argv: list[str]) -> str:
        words = []
        for a in argv:
            if a == str(IMAGEFS):
                words.append("imagefs")
            elif a in self.names:
                words.append(f'"${self.names[a]}"')
            else:
                words.append(shlex.quote(a))
        return " ".join(words)

    def run(self, argv: list[str]) -> Sample:
        """Run one command in the work dir and time it; raise CommandFailed if it fails."""
        shown = self.show(argv)
        if shown not in self.commands:
            self.commands.append(shown)
        os.sync()  # flush earlier steps' writes so they do not land inside this timing
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=self.work, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace")
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            out = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
            raise CommandFailed(f"command failed (exit {proc.returncode}): {shown}\n{out}")
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"  {seconds:7.2f} s  {shown}", file=sys.stderr)
        return Sample(seconds, cpu, proc.stdout)

    def row(self, key: str, label: str, unit: str, target: float | None = None,
            in_table: bool = True, targets: list[tuple[str, float]] | None = None,
            higher_is_better: bool = False) -> Row:
        if target is not None:
            targets = [("wimlib", target), *(targets or [])]
        r = Row(key, label, unit, targets=targets or [], higher_is_better=higher_is_better,
                in_table=in_table)
        self.rows.append(r)
        return r

    def size(self, name: str) -> int:
        return (self.work / name).stat().st_size

    def imagefs(self, verb: str, *args: str, level: bool = False) -> list[str]:
        argv = [str(IMAGEFS), verb, *args]
        if level and self.level is not None:
            argv += ["--level", str(self.level)]
        return argv


def timed(row: Row, tool: str, sample: Sample | float) -> None:
    """Record one run; the row keeps the best (least time, or most throughput)."""
    if isinstance(sample, Sample):
        row.samples.setdefault(tool, []).append(
            {"seconds": round(sample.seconds, 4), "cpu_seconds": round(sample.cpu_seconds, 4)})
    else:
        row.samples.setdefault(tool, []).append({"seconds": round(sample, 4)})
    pick = max if row.higher_is_better else min
    row.values[tool] = pick(s["seconds"] for s in row.samples[tool])


def fixture_tree(name: str) -> Path:
    proc = subprocess.run([str(REPO / "scripts" / "fixture-tree"), name],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CommandFailed(f"scripts/fixture-tree {name} failed (exit {proc.returncode})")
    return Path(proc.stdout.strip())


def warm_page_cache(root: Path) -> None:
    """Read every regular file once, so the first tool to capture pays no cold reads."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if not stat.S_ISREG(os.lstat(p).st_mode):
                    continue
                with open(p, "rb", buffering=0) as fh:
                    while fh.read(1 << 20):
                        pass
            except OSError:
                pass


def version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except OSError:
        return "?"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def measure(b: Bench, trees: list[tuple[str, str, Path]]) -> None:
    # Each tree alone.
    for name, short, src in trees:
        cap = b.row(f"capture.{name}", f"capture {name} (s)", "s", target=1.0)
        timed(cap, "imagefs", b.run(b.imagefs("capture", str(src), f"{short}.imagefs",
                                              "--name", name, level=True)))
        timed(cap, "wimlib", b.run(["wimcapture", str(src), f"{short}.wim", name, *WIM_OPTS]))
        timed(cap, "squashfs", b.run(["mksquashfs", str(src), f"{short}.sqfs",
                                      "-comp", "zstd", "-noappend", "-quiet"]))
    for name, short, _src in trees:
        size = b.row(f"size.{name}", f"size {name} (MiB)", "bytes", target=1.0)
        size.values = {"imagefs": b.size(f"{short}.imagefs"), "wimlib": b.size(f"{short}.wim"),
                       "squashfs": b.size(f"{short}.sqfs")}

    if len(trees) == 2:
        (n1, _s1, src1), (n2, _s2, src2) = trees
        # Both in one file: capture the first tree, then time the second capture (append).
        # (This repeats the capture-alone row, so it goes to the JSON only.)
        first = b.row(f"pair.first.{n1}", f"capture {n1} into the pair file (s)", "s",
                      in_table=False)
        timed(first, "imagefs", b.run(b.imagefs("capture", str(src1), "pair.imagefs",
                                                "--name", n1, level=True)))
        timed(first, "wimlib", b.run(["wimcapture", str(src1), "pair.wim", n1, *WIM_OPTS]))
        app = b.row(f"append.{n2}", f"append {n2} as index 2 (s)", "s")
        timed(app, "imagefs", b.run(b.imagefs("capture", str(src2), "pair.imagefs",
                                              "--name", n2, level=True)))
        timed(app, "wimlib", b.run(["wimappend", str(src2), "pair.wim", n2, *WIM_OPTS]))
        both = b.row("size.both", "size of both in one file (MiB)", "bytes", target=1.0)
        both.values = {"imagefs": b.size("pair.imagefs"), "wimlib": b.size("pair.wim")}
        img, wim, index, what = "pair.imagefs", "pair.wim", "2", f"index 2 ({n2})"
        vwhat = "the two-index file"
    else:
        name, short, _src = trees[0]
        img, wim, index, what = f"{short}.imagefs", f"{short}.wim", "1", f"index 1 ({name})"
        vwhat = f"the {name} file"

    # Apply: best of two runs each, interleaved, into a fresh empty dir every time.
    apply = b.row("apply", f"apply {what}, best of 2 (s)", "s", target=1.5)
    dest = b.work / "applied"
    for _ in range(2):
        for tool, argv in (("imagefs", b.imagefs("apply", img, index, "applied")),
                           ("wimlib", ["wimapply", wim, index, "applied", "--unix-data"])):
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            timed(apply, tool, b.run(argv))
            shutil.rmtree(dest)

    ver = b.row("verify", f"verify {vwhat} (s)", "s")
    timed(ver, "imagefs", b.run(b.imagefs("verify", img)))
    timed(ver, "wimlib", b.run(["wimverify", wim]))

    exp = b.row("export", f"export {what} (s)", "s")
    timed(exp, "imagefs", b.run(b.imagefs("export", img, index, "export.imagefs", level=True)))
    timed(exp, "wimlib", b.run(["wimexport", wim, index, "export.wim"]))
    exp_size = b.row("size.export", f"size of exported {what} (MiB)", "bytes")
    exp_size.values = {"imagefs": b.size("export.imagefs"), "wimlib": b.size("export.wim")}


def fmt(row: Row, tool: str) -> str:
    v = row.values.get(tool)
    if v is None:
        return "-"
    if row.unit == "bytes":
        return f"{v / MIB:.2f}"
    if row.unit == "MB":
        return f"{v:.1f}"
    return f"{v:.0f}" if row.unit in ("MB/s", "MiB/s", "IOPS", "files/s") else f"{v:.2f}"


def table(rows: list[Row]) -> str:
    head = ["measurement", *TOOLS, *(f"/{p}" for p in PEERS), "target", "result"]
    body = []
    for r in rows:
        ratios = [f"{x:.3f}" if x is not None else "-"
                  for x in (r.ratio_to(p) for p in PEERS)]
        result = {True: "PASS", False: "FAIL", None: ""}[r.passed]
        body.append([r.label, *(fmt(r, t) for t in TOOLS), *ratios, r.target_text(), result])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in body]
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the bookworm-minbase tree")
    ap.add_argument("--json", metavar="PATH",
                    help="write all numbers as JSON to PATH (a directory gets PATH/bench.json)")
    ap.add_argument("--level", type=int, help="zstd level for imagefs capture and export")
    ap.add_argument("--no-export", action="store_true",
                    help="skip the export and optimize rows (scripts/bench_export.py)")
    ap.add_argument("--no-mount", action="store_true", help="skip the mount rows")
    ap.add_argument("--no-rw", action="store_true", help="skip the writable-mount rows")
    ap.add_argument("--no-io", action="store_true",
                    help="skip the writable I/O workloads (fio, dbench, small files)")
    ap.add_argument("--no-daemon", action="store_true", help="skip the daemon rows")
    ap.add_argument("--no-store", action="store_true",
                    help="skip the store rows (push, pull, apply and mount through SeaweedFS)")
    ap.add_argument("--no-servicing", action="store_true",
                    help="skip the servicing rows (package, feature, generalize, driver "
                         "beside wimlib)")
    return ap.parse_args()


def missing_tool() -> str | None:
    for tool in ("wimcapture", "wimappend", "wimapply", "wimverify", "wimexport", "wimdelete",
                 "wimoptimize", "zstd", "mksquashfs",
                 "wimmount", "wimunmount", "squashfuse_ll", "fusermount3", "wimmountrw",
                 "fuse-overlayfs", "fio", "dbench"):
        if not shutil.which(tool):
            return tool
    return None


def lock_work_dir(tmp: Path) -> None:
    """One bench at a time per work dir: a second run waits instead of deleting the first's
    files.  The lock is held until the process exits."""
    lock = os.open(tmp / "imagefs-bench.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("bench: another scripts/bench is running; waiting for it", file=sys.stderr)
        fcntl.flock(lock, fcntl.LOCK_EX)


@dataclass
class Run:
    """One bench run: its rows and the conditions it ran under."""

    args: argparse.Namespace
    work: Path
    bench: Bench
    trees: list[tuple[str, str, Path]]
    started: datetime.datetime
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]
    elapsed: float = 0.0


def run_all(args: argparse.Namespace, work: Path) -> Run:
    started = datetime.datetime.now(datetime.UTC)
    selected = TREES[:1] if args.quick else TREES
    trees = [(name, short, fixture_tree(name)) for name, short in selected]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = {str(src): short for _n, short, src in trees}
    b = Bench(work, names, args.level)
    load_start = os.getloadavg()
    print("bench: reading the source trees into the page cache", file=sys.stderr)
    for _n, _s, src in trees:
        warm_page_cache(src)
    measure(b, trees)
    if not args.no_export:
        measure_export(b, trees, str(IMAGEFS), timed)
    if not args.no_mount:
        measure_mounts(b, trees, str(IMAGEFS), timed)
    if not args.no_rw:
        measure_rw(b, trees, str(IMAGEFS), timed)
    if not args.no_io:
        measure_io(b, trees, str(IMAGEFS), timed)
    if not args.no_daemon:
        measure_daemon(b, trees, str(IMAGEFS), timed)
    if not args.no_servicing:
        for part in (measure_servicing, measure_features, measure_generalize,
                     measure_drivers):
            part(b, trees, str(IMAGEFS), timed)
    if not args.no_store:
        measure_store(b, trees, str(IMAGEFS), timed)
    return Run(args, work, b, trees, started, load_start, os.getloadavg())


def report(run: Run, versions: dict[str, str]) -> list[str]:
    """Print the table and the commands behind it; returns the rows that failed a target."""
    b = run.bench
    print()
    print(f"imagefs benchmark{' (--quick)' if run.args.quick else ''}: "
          f"{run.started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
          f"{run.load_start[0]:.2f} at start, {run.load_end[0]:.2f} at end")
    print("mount rows: wimlib = wimmount, squashfs = squashfuse_ll, kernel-squashfs = mount -t "
          "squashfs -o loop,ro, plain = the source directory")
    print("rw rows: wimlib = wimmountrw + wimunmount --commit, plain = an empty directory on "
          "the work dir's disk")
    print("rw io rows: fuse-overlayfs with allow_other,default_permissions as imagefs has, "
          "plain = a copy of the tree on the work dir's disk")
    print("store rows (SeaweedFS on loopback): s3-copy = the whole image file as one object "
          "(boto3), rsync = the file between two folders, plain = the same from a local file")
    print(f"times in seconds (wall clock), sizes in MiB; versions: {versions['imagefs']}; "
          f"{versions['wimlib']}; {versions['squashfs']}")
    print()
    print(table([r for r in b.rows if r.in_table]))
    for n in b.notes:
        print(f"note: {n}")
    print()
    print("commands (run in $work; each timed alone; apply into an empty dir removed after "
          "each run):")
    print(f"  work={shlex.quote(str(run.work))}")
    for name, short, src in run.trees:
        print(f"  {short}={shlex.quote(str(src))}  # {name}")
    print(f"  imagefs={shlex.quote(str(IMAGEFS))}")
    for c in b.commands:
        print(f"  {c}")
    failed = [r.label for r in b.rows if r.passed is False]
    print()
    print(f"targets: {'all met' if not failed else 'FAILED: ' + '; '.join(failed)}")
    print(f"bench took {run.elapsed:.0f} s")
    return failed


def write_json(run: Run, versions: dict[str, str], failed: list[str], where: str) -> None:
    path = Path(where)
    if path.is_dir() or where.endswith("/"):
        path = path / "bench.json"
    doc = {
        "started": run.started.isoformat(timespec="seconds"),
        "elapsed_seconds": round(run.elapsed, 2),
        "quick": run.args.quick,
        "imagefs_level": run.args.level,
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in run.load_start],
        "loadavg_end": [round(x, 2) for x in run.load_end],
        "versions": versions,
        "work": str(run.work),
        "trees": {name: str(src) for name, _s, src in run.trees},
        "commands": run.bench.commands,
        "notes": run.bench.notes,
        "all_targets_met": not failed,
        "measurements": [row_json(r) for r in run.bench.rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def row_json(r: Row) -> dict[str, Any]:
    def rounded(x: float | None) -> float | None:
        return round(x, 4) if x is not None else None

    return {"key": r.key, "label": r.label,
            "unit": {"s": "seconds", "bytes": "bytes"}.get(r.unit, r.unit),
            "in_table": r.in_table,
            **{t: r.values.get(t) for t in TOOLS},
            "ratio_imagefs_wimlib": rounded(r.ratio),
            "ratio_imagefs_squashfs": rounded(r.ratio_to("squashfs")),
            "ratio_imagefs_kernel_squashfs": rounded(r.ratio_to("kernel-squashfs")),
            "ratio_imagefs_fuse_overlayfs": rounded(r.ratio_to("fuse-overlayfs")),
            "targets": r.target_text(), "pass": r.passed,
            "samples": r.samples}


def standalone(script: str, doc: str, tools: tuple[str, ...], title: str,
               measure: Callable[..., None]) -> int:
    """The main of a scripts/bench_*.py: its rows alone (run_alone) on bookworm-minbase,
    measure(b, trees, imagefs, timed) as scripts/bench calls it; --json PATH keeps them."""
    ap = argparse.ArgumentParser(prog=f"scripts/{script}", description=doc.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = ap.parse_args()
    return run_alone(script.removesuffix(".py").replace("_", "-"), tools, title,
                     lambda b, trees: measure(b, trees, str(IMAGEFS), timed), None, args.json)


def run_alone(prog: str, tools: tuple[str, ...], title: str,
              measure: Callable[[Bench, list[tuple[str, str, Path]]], None],
              level: int | None = None, json_path: str | None = None,
              tree: str = "bookworm-minbase") -> int:
    """Run one group of rows alone on one fixture tree, bookworm-minbase unless `tree` (a
    bench_*.py's main): its own work dir and lock, then the table, the commands behind it,
    the targets and, with json_path, the rows as JSON."""
    for tool in tools:
        if not shutil.which(tool):
            print(f"{prog}: {tool} not found (see scripts/setup)", file=sys.stderr)
            return 1
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    work = tmp / f"imagefs-{prog}"
    lock = os.open(tmp / f"imagefs-{prog}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    start = time.perf_counter()
    name, short = tree, dict(TREES)[tree]
    src = fixture_tree(name)
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        b = Bench(work, {str(src): short}, level)
        warm_page_cache(src)
        measure(b, [(name, short, src)])
    except CommandFailed as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{title}, {os.cpu_count()} CPUs\n")
    print(table([r for r in b.rows if r.in_table]))
    for n in b.notes:
        print(f"note: {n}")
    print(f"\ncommands (run in work={shlex.quote(str(work))}, "
          f"{short}={shlex.quote(str(src))}):")
    for c in b.commands:
        print(f"  {c}")
    failed = [r.label for r in b.rows if r.passed is False]
    print(f"\ntargets: {'all met' if not failed else 'FAILED: ' + '; '.join(failed)}")
    print(f"took {time.perf_counter() - start:.0f} s")
    if json_path:
        Path(json_path).write_text(json.dumps([row_json(r) for r in b.rows], indent=2) + "\n")
    return 0


def main() -> int:
    args = parse_args()
    t_start = time.perf_counter()
    tool = missing_tool()
    if tool:
        print(f"bench: {tool} not found (scripts/setup installs wimtools, squashfs-tools, "
              "squashfuse, fuse3, fuse-overlayfs, fio, dbench)", file=sys.stderr)
        return 1
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    work = tmp / "imagefs-bench"
    lock_work_dir(tmp)
    try:
        run = run_all(args, work)
    except CommandFailed as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.elapsed = time.perf_counter() - t_start
    versions = {"imagefs": version([str(IMAGEFS), "--version"]),
                "wimlib": version(["wimcapture", "--version"]),
                "squashfs": version(["mksquashfs", "-version"])}
    failed = report(run, versions)
    if args.json:
        write_json(run, versions, failed, args.json)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main's finally has removed the work dir
        sys.exit(130)
