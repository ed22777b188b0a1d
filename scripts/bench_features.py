"""Feature (systemd unit) benchmarks for scripts/bench (issue 15): changing units of an
index as one imagefs transaction beside the same done by hand with wimlib, and listing them.

On the bookworm-minbase tree, each change on a fresh copy of the image (imagefs) or the
LZX WIM:
  * disable ssh and apt-daily.timer: imagefs `feature disable IMAGE 1 ssh apt-daily.timer`
    (plan from the image, open a session, systemctl --root, update-rc.d and
    deb-systemd-helper in the image's container, check, commit) -> s; wimlib:
    `wimmountrw --unix-data`, `systemctl --root=MNT disable ...`, `wimunmount --commit`;
    plain: `wimapply`, `systemctl --root=DIR disable ...`, `wimcapture` a new WIM.
  * a role (disable two timers, mask e2scrub_reap, enable ssh after its disable above is
    undone...): imagefs `feature apply IMAGE 1 ROLE` -> s; wimlib and plain: the same
    systemctl --root calls in one mount (or one applied directory).
  * the growth of the image (or WIM) by each, in bytes (metadata only: no target).
  * feature list: imagefs `feature list IMAGE 1` (a copy of the unit directories read from
    the image, the host's systemctl on it) beside `wimmount`, `systemctl --root=MNT
    list-unit-files`, `wimunmount` (wimlib) and systemctl on the fixture tree itself
    (plain); and, for the record of the design, the same systemctl on an imagefs
    read-only mount of the index (its FUSE requests make it slow).
Targets: a transaction <= 0.5x the wimlib workflow's time.  Best of RUNS, interleaved.

Run inside scripts/bench or alone:
  .venv/bin/python scripts/bench_features.py [--json PATH]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import RUNS, environment, shell

WIM_OPTS = ["--unix-data", "--compress=LZX"]
PEERS = ("imagefs", "wimlib", "plain")
ENV = {"IMAGEFS_STATE_DIR": "feat-state", "IMAGEFS_RUN_DIR": "feat-run"}
SYSTEMCTL = "SYSTEMCTL_SKIP_SYSV=1 systemctl --no-pager"
DISABLE = ("ssh.service", "apt-daily.timer")
ROLE = {"disable": ("apt-daily.timer", "apt-daily-upgrade.timer", "fstrim.timer"),
        "mask": ("e2scrub_reap.service",), "enable": ("systemd-networkd.service",)}
WORK = ("feat-mnt", "feat-dir", "feat-state", "feat-run", "feat-ro")


def measure_features(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                     timed: Callable[..., None]) -> None:
    name, short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    try:
        with environment(b.work, ENV):
            _measure(b, name, short, src, imagefs, timed)
    finally:
        for mp in ("feat-mnt", "feat-ro"):
            if os.path.ismount(b.work / mp):
                subprocess.run(["umount", "-l", str(b.work / mp)], capture_output=True)
        for d in WORK:
            shutil.rmtree(b.work / d, ignore_errors=True)
        for f in ("feat.imagefs", "feat.wim", "feat-new.wim", "role.toml"):
            (b.work / f).unlink(missing_ok=True)


def _measure(b: Any, name: str, short: str, src: Path, imagefs: str,
             timed: Callable[..., None]) -> None:
    image, wim = f"{short}.imagefs", f"{short}.wim"
    if not (b.work / image).exists():
        b.run([imagefs, "capture", str(src), image, "--name", name])
    if not (b.work / wim).exists():
        b.run(["wimcapture", str(src), wim, name, *WIM_OPTS])
    (b.work / "role.toml").write_text(
        "[units]\n" + "".join(f"{verb} = {list(units)!r}\n" for verb, units in ROLE.items())
        .replace("'", '"'))
    by_hand_role = " && ".join(f"{SYSTEMCTL} --root={{root}} {verb} {' '.join(units)} "
                               ">/dev/null 2>&1" for verb, units in ROLE.items())
    by_hand_disable = f"{SYSTEMCTL} --root={{root}} disable {' '.join(DISABLE)} >/dev/null 2>&1"
    for label, key, verb, by_hand in (
            (f"disable {' '.join(DISABLE)}", "disable",
             ["feature", "disable", "feat.imagefs", "1", *DISABLE], by_hand_disable),
            ("apply a role (3 disable, 1 mask, 1 enable)", "apply",
             ["feature", "apply", "feat.imagefs", "1", "role.toml"], by_hand_role)):
        t_row = b.row(f"feat.{key}", f"features: {label} (s)", "s", target=0.5)
        g_row = b.row(f"feat.{key}.growth", f"features: {label}, growth (MiB; no target)",
                      "bytes")
        for _run, tool in ((r, t) for r in range(RUNS) for t in PEERS):
            before, seconds, after = _change(b, tool, image, wim, imagefs, verb, by_hand)
            timed(t_row, tool, seconds)
            g_row.values[tool] = after - before
    _measure_list(b, image, wim, imagefs, src, timed)


def _change(b: Any, tool: str, image: str, wim: str, imagefs: str, verb: list[str],
            by_hand: str) -> tuple[int, float, int]:
    """One change by tool on a fresh copy: (size before, seconds, size after)."""
    if tool == "imagefs":
        shutil.copyfile(b.work / image, b.work / "feat.imagefs")
        before = b.size("feat.imagefs")
        s = b.run([imagefs, *verb, "--no-daemon"])
        return before, s.seconds, b.size("feat.imagefs")
    shutil.copyfile(b.work / wim, b.work / "feat.wim")
    before = b.size("feat.wim")
    if tool == "wimlib":
        (b.work / "feat-mnt").mkdir(exist_ok=True)
        seconds = shell(b, "wimmountrw feat.wim 1 feat-mnt --unix-data && "
                           f"{by_hand.format(root='feat-mnt')}; rc=$?; "
                           "wimunmount feat-mnt --commit >/dev/null; exit $rc")
        return before, seconds, b.size("feat.wim")
    shutil.rmtree(b.work / "feat-dir", ignore_errors=True)
    (b.work / "feat-new.wim").unlink(missing_ok=True)
    seconds = shell(b, "wimapply feat.wim 1 feat-dir --unix-data >/dev/null && "
                       f"{by_hand.format(root='feat-dir')} && "
                       f"wimcapture feat-dir feat-new.wim changed {' '.join(WIM_OPTS)} "
                       ">/dev/null")
    return before, seconds, b.size("feat-new.wim")


def _measure_list(b: Any, image: str, wim: str, imagefs: str, src: Path,
                  timed: Callable[..., None]) -> None:
    """feature list: imagefs from the image (no mount); wimlib = wimmount, systemctl
    list-unit-files on it, wimunmount; plain = systemctl on the fixture tree.  No target:
    shown for scale.  Then systemctl on an imagefs read-only mount: the approach not
    taken."""
    row = b.row("feat.list", "features: feature list (s)", "s")
    (b.work / "feat-mnt").mkdir(exist_ok=True)
    query = f"{SYSTEMCTL} --root={{}} list-unit-files >/dev/null"
    for _run in range(RUNS):
        timed(row, "imagefs", b.run([imagefs, "feature", "list", image, "1", "--no-daemon"]))
        timed(row, "wimlib", shell(b, f"wimmount {wim} 1 feat-mnt --unix-data && "
                                      f"{query.format('feat-mnt')}; rc=$?; "
                                      "wimunmount feat-mnt >/dev/null; exit $rc"))
        timed(row, "plain", shell(b, query.format(src)))
    fuse = b.row("feat.list.mount", "features: systemctl list-unit-files on an imagefs "
                 "mount (s; not used)", "s")
    (b.work / "feat-ro").mkdir(exist_ok=True)
    timed(fuse, "imagefs", shell(b, f"{imagefs} mount {image} 1 feat-ro && "
                                    f"{query.format('feat-ro')}; rc=$?; "
                                    f"{imagefs} unmount feat-ro; exit $rc"))


def main() -> int:
    """Run these rows alone, with bench.py's table."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    return bench.standalone(
        "bench_features.py", __doc__ or "",
        ("wimcapture", "wimmountrw", "wimunmount", "wimapply", "wimmount", "systemctl"),
        "imagefs feature benchmark; wimlib = wimmountrw, systemctl --root, wimunmount "
        "--commit; plain = wimapply, systemctl --root, wimcapture",
        measure_features)


if __name__ == "__main__":
    sys.exit(main())
