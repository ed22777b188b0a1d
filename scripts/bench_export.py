"""Export and optimize benchmarks for scripts/bench (issue 16), beside wimlib.

On the two fixture trees as two indices of one file (bookworm-minbase, then bookworm-web),
the imagefs file at the default level and the wimlib file LZX:
  * export of index 2 into a new file: time, best of RUNS interleaved (imagefs export vs
    wimexport; target <= 1.0x), and the process's peak RSS (os.wait4's ru_maxrss of that
    one process; target <= 64 MB);
  * optimize after deleting index 1 (imagefs delete + optimize vs wimlib's wimdelete +
    wimoptimize), each on a fresh copy: time and the file's size after;
  * the most compact two-index file: imagefs `export all --compact` (8 MiB packs at zstd
    19, content by kind and name; its time) beside `wimoptimize --solid` (LZMS solid) and
    `tar | zstd -19 --long=27 -T0` of both trees (plain): target <= 50 MB and <= 0.9x wimlib solid;
  * tar read-all of a fresh read-only mount of index 2 of the compact file over the same
    of the default file (best of RUNS each, interleaved): target <= 1.5.

Run inside scripts/bench (--no-export skips these rows) or alone:
  .venv/bin/python scripts/bench_export.py [--json PATH]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import RUNS, shell

WIM_OPTS = ["--unix-data", "--compress=LZX"]
COMPACT_LIMIT = 50_000_000  # bytes: the compact two-index file's absolute target
PEAK_LIMIT = 64  # MB: export's peak RSS


def measure_export(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                   timed: Callable[..., None]) -> None:
    if len(trees) < 2:
        b.note("export rows: need both fixture trees (not with --quick)")
        return
    try:
        _measure(b, trees, imagefs, timed)
    finally:
        for f in ("exp.imagefs", "exp.wim", "opt.imagefs", "opt.wim", "solid.wim",
                  "both.tar.zst", "compact.imagefs"):
            (b.work / f).unlink(missing_ok=True)


def _pair(b: Any, trees: list[tuple[str, str, Path]], imagefs: str) -> tuple[str, str]:
    """The two-index files (made here unless scripts/bench's first rows made them)."""
    (n1, _s1, src1), (n2, _s2, src2) = trees[:2]
    if not (b.work / "pair.imagefs").exists():
        for name, src in ((n1, src1), (n2, src2)):
            b.run([imagefs, "capture", str(src), "pair.imagefs", "--name", name])
    if not (b.work / "pair.wim").exists():
        b.run(["wimcapture", str(src1), "pair.wim", n1, *WIM_OPTS])
        b.run(["wimappend", str(src2), "pair.wim", n2, *WIM_OPTS])
    return "pair.imagefs", "pair.wim"


def _peak(b: Any, argv: list[str]) -> float:
    """The peak RSS (MB) of argv run alone in the work dir."""
    proc = subprocess.Popen(argv, cwd=b.work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}")
    return usage.ru_maxrss * 1024 / 1e6


def _measure(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
             timed: Callable[..., None]) -> None:
    img, wim = _pair(b, trees, imagefs)
    exp = b.row("export.2", "export index 2 of the pair, moving packs (s)", "s", target=1.0)
    for _run in range(RUNS):
        for tool, argv, out in (("imagefs", [imagefs, "export", img, "2", "exp.imagefs"],
                                 "exp.imagefs"),
                                ("wimlib", ["wimexport", wim, "2", "exp.wim"], "exp.wim")):
            (b.work / out).unlink(missing_ok=True)
            timed(exp, tool, b.run(argv))
    peak = b.row("export.2.peak", "export index 2, peak RSS (MB)", "MB",
                 targets=[("abs", PEAK_LIMIT)])
    for tool, argv, out in (("imagefs", [imagefs, "export", img, "2", "exp.imagefs"],
                             "exp.imagefs"),
                            ("wimlib", ["wimexport", wim, "2", "exp.wim"], "exp.wim")):
        (b.work / out).unlink(missing_ok=True)
        peak.values[tool] = _peak(b, argv)

    opt = b.row("optimize", "delete index 1, then optimize (s)", "s")
    opt_size = b.row("optimize.size", "size after delete + optimize (MiB)", "bytes")
    for _run in range(RUNS):
        shutil.copyfile(b.work / img, b.work / "opt.imagefs")
        shutil.copyfile(b.work / wim, b.work / "opt.wim")
        b.run([imagefs, "delete", "opt.imagefs", "1"])
        b.run(["wimdelete", "opt.wim", "1"])
        timed(opt, "imagefs", b.run([imagefs, "optimize", "opt.imagefs"]))
        timed(opt, "wimlib", b.run(["wimoptimize", "opt.wim"]))
        opt_size.values = {"imagefs": b.size("opt.imagefs"), "wimlib": b.size("opt.wim")}

    compact = b.row("size.compact", "most compact two-index file (MiB)", "bytes",
                    target=0.9, targets=[("abs", COMPACT_LIMIT)])
    made = b.row("export.compact", "export all --compact (s)", "s")
    (b.work / "compact.imagefs").unlink(missing_ok=True)
    timed(made, "imagefs", b.run([imagefs, "export", img, "all", "compact.imagefs",
                                  "--compact"]))
    _read_all(b, imagefs, timed)
    shutil.copyfile(b.work / wim, b.work / "solid.wim")
    b.run(["wimoptimize", "solid.wim", "--solid"])
    srcs = " ".join(str(src) for _n, _s, src in trees[:2])
    shell(b, f"tar -cf - {srcs} 2>/dev/null | zstd -19 --long=27 -T0 -q -o both.tar.zst")
    compact.values = {"imagefs": b.size("compact.imagefs"), "wimlib": b.size("solid.wim"),
                      "plain": b.size("both.tar.zst")}
    b.note("export/optimize: the most compact imagefs file is `export all --compact` (8 MiB "
           "packs at zstd 19, content by kind and name); plain = tar | zstd -19 --long=27 "
           "of both trees; wimlib = wimoptimize --solid (LZMS)")


def _read_all(b: Any, imagefs: str, timed: Callable[..., None]) -> None:
    """tar read-all of a fresh read-only mount of index 2, the compact file beside the
    default one, best of RUNS each, interleaved: the row holds compact / default."""
    mnt = b.work / "exp-mnt"
    mnt.mkdir(exist_ok=True)
    best: dict[str, float] = {}
    for _run in range(RUNS):
        for name in ("compact.imagefs", "pair.imagefs"):
            b.run([imagefs, "mount", name, "2", str(mnt)])
            try:
                seconds = shell(b, f"tar -cf - -C {mnt} . | cat >/dev/null")
            finally:
                subprocess.run([imagefs, "unmount", str(mnt)], capture_output=True)
            best[name] = min(best.get(name, seconds), seconds)
    row = b.row("mount.compact", "read-all of a fresh mount, compact / default file", "x",
                targets=[("abs", 1.5)])
    row.values["imagefs"] = best["compact.imagefs"] / best["pair.imagefs"]


def main() -> int:
    """Run these rows alone (both fixture trees), with bench.py's table."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    trees = [(name, short, bench.fixture_tree(name)) for name, short in bench.TREES]

    def both(b: Any, _one: list[tuple[str, str, Path]]) -> None:
        for _n, _s, src in trees[1:]:
            bench.warm_page_cache(src)
        measure_export(b, trees, str(bench.IMAGEFS), bench.timed)

    return bench.run_alone(
        "bench-export", ("wimcapture", "wimappend", "wimexport", "wimdelete", "wimoptimize",
                         "zstd"),
        "imagefs export/optimize benchmark; wimlib = wimexport, wimoptimize (LZX files)",
        both, json_path=_json_arg())


def _json_arg() -> str | None:
    args = sys.argv[1:]
    return args[args.index("--json") + 1] if "--json" in args[:-1] else None


if __name__ == "__main__":
    sys.exit(main())
