"""Generalize benchmark for scripts/bench (issue 15): `imagefs generalize` of a specialised
bookworm-minbase index as one whole transaction beside the same done by hand with wimlib.

Once, untimed: bookworm-minbase is copied and given one machine's identity (apt lists and
caches, a journal and logs, shell histories, a DHCP lease, a random seed, temporary
files, on top of the host keys, hostname and passwd backups it has), and captured as
gen.imagefs (index 1) and as gen.wim (LZX).  imagefs's plan (`--dry-run --json`) is
turned into a shell script doing the same removals and changes, and the files imagefs
adds (the first-boot queue and its unit, the preset file) are staged, so that both sides
do the same work.  Then, each run on a fresh copy, best of RUNS, interleaved:
  * imagefs: `imagefs generalize gen.imagefs 1 --new-index generalized` (plan from the
    image, open a session, remove and change, check, commit as a new index);
  * wimlib: `wimapply gen.wim 1 DIR`, the same removals and changes, `wimappend DIR
    gen.wim generalized` (the new image into the same WIM file);
  * the growth of the image file (or WIM) by each;
  * the plan alone (`imagefs generalize --dry-run`), for scale.
Targets: the transaction <= 0.5x the wimlib workflow's time; imagefs's growth <= 64 KiB
(the generalized index shares all its content with the specialised one).

Run inside scripts/bench or alone:
  .venv/bin/python scripts/bench_generalize.py [--json PATH]
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import RUNS, environment, shell

WIM_OPTS = ["--unix-data", "--compress=LZX"]
GROWTH_LIMIT = 64 << 10
ENV = {"IMAGEFS_STATE_DIR": "gen-state", "IMAGEFS_RUN_DIR": "gen-run"}
MACHINE_ID = "5ee0c0ffee5ee0c0ffee5ee0c0ffee01"
# One machine's identity, relative path -> size in bytes (content: repeated text).
IDENTITY = {
    "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages":
        20 << 20,
    "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": 150 << 10,
    "var/cache/apt/pkgcache.bin": 12 << 20, "var/cache/apt/srcpkgcache.bin": 12 << 20,
    "var/cache/apt/archives/hello_2.10-3_amd64.deb": 53 << 10,
    f"var/log/journal/{MACHINE_ID}/system.journal": 8 << 20,
    "var/log/syslog": 2 << 20, "var/log/auth.log": 256 << 10, "var/log/dpkg.log": 300 << 10,
    "var/log/wtmp": 64 << 10, "root/.bash_history": 4 << 10,
    "var/lib/dhcp/dhclient.eth0.leases": 1 << 10, "var/lib/systemd/random-seed": 512,
    "tmp/build.log": 1 << 20, "var/tmp/cache.bin": 1 << 20,
}


def measure_generalize(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                       timed: Callable[..., None]) -> None:
    _name, _short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    try:
        with environment(b.work, ENV):
            _measure(b, src, imagefs, timed)
    finally:
        for d in ("gen-src", "gen-dir", "gen-state", "gen-run", "gen-stage"):
            shutil.rmtree(b.work / d, ignore_errors=True)
        for f in ("gen.imagefs", "gen.wim", "gen-run.imagefs", "gen-run.wim",
                  "gen-changes.sh"):
            (b.work / f).unlink(missing_ok=True)


def specialise(root: Path) -> None:
    """Give the tree at root one machine's identity (IDENTITY, a machine ID)."""
    for rel, size in IDENTITY.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        line = f"{rel} of a specialised machine {MACHINE_ID}\n".encode()
        path.write_bytes((line * (size // len(line) + 1))[:size])
    (root / "etc/machine-id").write_text(MACHINE_ID + "\n")


def _measure(b: Any, src: Path, imagefs: str, timed: Callable[..., None]) -> None:
    subprocess.run(["cp", "-a", str(src), str(b.work / "gen-src")], check=True)
    specialise(b.work / "gen-src")
    b.names.setdefault(str(b.work / "gen-src"), "SPECIALISED")
    b.run([imagefs, "capture", str(b.work / "gen-src"), "gen.imagefs", "--name", "specialised"])
    b.run(["wimcapture", str(b.work / "gen-src"), "gen.wim", "specialised", *WIM_OPTS])
    _by_hand_script(b, imagefs)
    t_row = b.row("gen.run", "generalize: a specialised minbase as a new index (s)", "s",
                  target=0.5)
    g_row = b.row("gen.growth", "generalize: growth of the file (MiB; target: bytes)", "bytes",
                  targets=[("abs", GROWTH_LIMIT)])
    p_row = b.row("gen.plan", "generalize: the plan alone, --dry-run (s)", "s")
    for _run in range(RUNS):
        for tool in ("imagefs", "wimlib"):
            before, seconds, after = _generalize(b, tool, imagefs)
            timed(t_row, tool, seconds)
            g_row.values[tool] = after - before
        timed(p_row, "imagefs", b.run([imagefs, "generalize", "gen.imagefs", "1",
                                       "--dry-run", "--no-daemon"]))


def _generalize(b: Any, tool: str, imagefs: str) -> tuple[int, float, int]:
    """One generalize by tool on a fresh copy: (size before, seconds, size after)."""
    if tool == "imagefs":
        shutil.copyfile(b.work / "gen.imagefs", b.work / "gen-run.imagefs")
        before = b.size("gen-run.imagefs")
        s = b.run([imagefs, "generalize", "gen-run.imagefs", "1", "--new-index",
                   "generalized", "--no-daemon"])
        return before, s.seconds, b.size("gen-run.imagefs")
    shutil.copyfile(b.work / "gen.wim", b.work / "gen-run.wim")
    shutil.rmtree(b.work / "gen-dir", ignore_errors=True)
    before = b.size("gen-run.wim")
    seconds = shell(b, "wimapply gen-run.wim 1 gen-dir --unix-data >/dev/null && "
                       "sh gen-changes.sh gen-dir && "
                       "wimappend gen-dir gen-run.wim generalized --unix-data >/dev/null")
    return before, seconds, b.size("gen-run.wim")


def _by_hand_script(b: Any, imagefs: str) -> None:
    """gen-changes.sh DIR: imagefs's plan done by hand (rm, rmdir, truncate, printf,
    ln), and the files imagefs adds copied from gen-stage."""
    plan = json.loads(subprocess.run(
        [imagefs, "generalize", str(b.work / "gen.imagefs"), "1", "--dry-run", "--json",
         "--no-daemon"], check=True, capture_output=True, text=True).stdout)
    lines = ['set -e', 'cd "$1"']
    for op in plan["indices"][0]["plan"]["operations"]:
        for a in op["actions"]:
            path = shlex.quote("." + a["path"])
            lines.append({"remove": f"rmdir {path}" if a["kind"] == "dir" else f"rm -f {path}",
                          "empty": f": > {path}",
                          "write": f"printf %s {shlex.quote(a.get('new', ''))} > {path}",
                          "create": f"printf %s {shlex.quote(a.get('new', ''))} > {path}",
                          "mkdir": f"mkdir {path}",
                          "link": f"ln -sfn {shlex.quote(a.get('target', ''))} {path}"}
                         [a["action"]])
    # The first-boot queue's files: taken from a generalized copy, staged, copied in.
    shutil.copyfile(b.work / "gen.imagefs", b.work / "gen-run.imagefs")
    subprocess.run([imagefs, "generalize", str(b.work / "gen-run.imagefs"), "1",
                    "--no-daemon"], check=True, capture_output=True)
    stage = b.work / "gen-stage"
    subprocess.run([imagefs, "extract", "--dest", str(stage), str(b.work / "gen-run.imagefs"),
                    "1", "/usr/lib/imagefs", "/var/lib/imagefs", "/etc/systemd/system"],
                   check=True, capture_output=True)
    lines.append(f"cp -a {shlex.quote(str(stage))}/. .")
    (b.work / "gen-changes.sh").write_text("\n".join(lines) + "\n")
    b.names.setdefault(str(stage), "STAGE")


def main() -> int:
    """Run these rows alone, with bench.py's table."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    return bench.standalone(
        "bench_generalize.py", __doc__ or "", ("wimcapture", "wimapply", "wimappend"),
        "imagefs generalize benchmark; wimlib = wimapply, the same removals and changes "
        "by hand, wimappend as a new image into the WIM",
        measure_generalize)


if __name__ == "__main__":
    sys.exit(main())
