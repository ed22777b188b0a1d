"""Writable-mount benchmarks for scripts/bench: `imagefs mount --rw` beside fuse-overlayfs and
the plain directory, and imagefs commit beside wimlib's (wimmountrw, wimunmount --commit).

On the bookworm-minbase tree, each on a fresh writable mount (imagefs: a session on index 1
of the captured image, dropped with `unmount --discard` after the run; fuse-overlayfs:
lowerdir = the extracted fixture tree, upperdir and workdir new empty dirs; plain: a new
empty directory beside them on the work dir's disk):
  * `dd if=SRC of=MNT/big bs=1M conv=fsync` of 1 GiB, SRC /dev/zero and a pre-made 1 GiB
    semi-compressible file (scripts/bench_mount.py's) -> MB/s;
  * create-write-close of 10 000 files of 100 bytes into MNT/small/ by one Python process
    (open, write, close each; no fsync) -> s;
  * `tar -xf minbase.tar` (the tree, tarred once, uncompressed) into an empty MNT/tarx;
  * `git init && git add -A && git commit` in MNT/repo after usr/share/doc of the tree was
    copied in (`cp -a`, timed apart: JSON only).
Then commit: imagefs on a fresh copy of the image, `mount --rw`, append a line to
etc/hostname, time `imagefs commit MNT`; then create 10 000 files of 100 bytes and time
`imagefs commit MNT` again.  wimlib on a fresh copy of the LZX WIM: `wimmountrw --unix-data`,
the same change, time `wimunmount MNT --commit`; mount again, the 10 000 files, time the
commit.  Only the commit step is timed (mounting and making the change are not).

Each measurement is the best of RUNS, every run on its own fresh mount, the tools
interleaved.  Targets: write throughput >= 0.5x fuse-overlayfs, small files and tar -x
<= 2x fuse-overlayfs, commit of 1 changed file <= 0.5 s and <= 0.5x wimlib (issue 17).
Sessions and mount records go to IMAGEFS_STATE_DIR / IMAGEFS_RUN_DIR under the work dir,
never /var/lib/imagefs or /run/imagefs.  Every mount is undone in a finally block; a mount
left under the work dir at the end is detached (umount -l) and reported.

Run inside scripts/bench (--no-rw skips these rows) or alone:
  .venv/bin/python scripts/bench_rw.py [--level L] [--json PATH] [--only dd,small,tarx,git,commit]
(--only: just those groups of rows, e.g. `--only dd` for the two dd rows).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import BIG_SIZE, RUNS, environment, make_big_tree, mounted, shell

# Column keys of bench.py's table: "fuse-overlayfs" for rows 1-4, "wimlib" = wimmountrw +
# wimunmount --commit for the commit rows, "plain" = an empty directory on the work disk.
OVERLAY = "fuse-overlayfs"
IO_PEERS = ("imagefs", OVERLAY, "plain")
COMMIT_PEERS = ("imagefs", "wimlib")
SMALL_FILES = 10_000
GIT_SUBTREE = "usr/share/doc"
WIM_OPTS = ["--unix-data", "--compress=LZX"]
# One process doing open, write, close per file (so the filesystem is measured, not fork()).
WRITE_SMALL = ("import os, sys; d = sys.argv[1]; os.mkdir(d); "
               "[os.write(fd := os.open(f'{d}/f{i}', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "
               "b'%099d\\n' % i) and os.close(fd) for i in range(int(sys.argv[2]))]")
# The environment of the measurement: sessions and mount records under the work dir; git
# with no user or system config.
ENV = {"IMAGEFS_STATE_DIR": "rw-state", "IMAGEFS_RUN_DIR": "rw-run"}
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


class RwMount:
    """One writable mount at work/rwmnt (or a plain directory), undone by close().  open()
    returns the path relative to the work dir, where b.run runs its commands.
    overlay_opts: more fuse-overlayfs -o options (e.g. allow_other,default_permissions);
    plain: a directory under the work dir to use as is for "plain" (say a copy of the tree;
    kept by close()), instead of a new empty one removed by close()."""

    def __init__(self, b: Any, tool: str, imagefs: str, lower: Path, overlay_opts: str = "",
                 plain: Path | None = None) -> None:
        self.b = b
        self.tool = tool
        self.imagefs = imagefs
        self.lower = lower
        self.overlay_opts = overlay_opts
        self.mnt = b.work / "rwmnt"
        self.ovl = b.work / "ovl"  # fuse-overlayfs upperdir and workdir
        self.plain = plain or b.work / "plainrw"
        self.keep_plain = plain is not None
        self.is_mounted = False

    def open(self, image: str = "") -> Path:
        if self.tool == "plain":
            if not self.keep_plain:
                shutil.rmtree(self.plain, ignore_errors=True)
                self.plain.mkdir()
            return self.plain.relative_to(self.b.work)
        self.mnt.mkdir(exist_ok=True)
        if mounted(self.mnt):
            raise RuntimeError(f"{self.mnt} is still mounted from an earlier step")
        if self.tool == "imagefs":
            argv = [self.imagefs, "mount", "--rw", image, "1", self.mnt.name]
        elif self.tool == OVERLAY:
            shutil.rmtree(self.ovl, ignore_errors=True)
            (self.ovl / "upper").mkdir(parents=True)
            (self.ovl / "work").mkdir()
            ovl = self.ovl.name
            opts = f"lowerdir={self.lower},upperdir={ovl}/upper,workdir={ovl}/work"
            if self.overlay_opts:
                opts += f",{self.overlay_opts}"
            argv = ["fuse-overlayfs", "-o", opts, self.mnt.name]
        else:  # wimlib
            argv = ["wimmountrw", image, "1", self.mnt.name, "--unix-data"]
        self.is_mounted = True  # from here on close() must try, even if the command failed
        self.b.run(argv)
        deadline = time.monotonic() + 20
        while not mounted(self.mnt):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.tool}: {self.mnt} did not appear as a mount")
            time.sleep(0.01)
        return Path(self.mnt.name)

    def commit(self) -> float:
        """Time the commit step: `imagefs commit` (the mount stays) or `wimunmount --commit`
        (the mount ends)."""
        if self.tool == "imagefs":
            return self.b.run([self.imagefs, "commit", self.mnt.name]).seconds
        seconds = self.b.run(["wimunmount", self.mnt.name, "--commit"]).seconds
        self.wait_gone()
        self.is_mounted = False
        return seconds

    def close(self) -> None:
        """Unmount, dropping uncommitted changes; never raises."""
        if self.tool == "plain":
            if not self.keep_plain:
                shutil.rmtree(self.plain, ignore_errors=True)
            return
        if not self.is_mounted:
            return
        argv = {"imagefs": [self.imagefs, "unmount", str(self.mnt), "--discard"],
                OVERLAY: ["fusermount3", "-u", str(self.mnt)],
                "wimlib": ["wimunmount", str(self.mnt)]}[self.tool]
        for _ in range(50):
            if not mounted(self.mnt):
                break
            if subprocess.run(argv, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        self.wait_gone()
        self.is_mounted = False
        if self.tool == OVERLAY:
            shutil.rmtree(self.ovl, ignore_errors=True)

    def wait_gone(self) -> None:
        # wimunmount (and a FUSE daemon generally) may return before the kernel lets go.
        deadline = time.monotonic() + 20
        while mounted(self.mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        if mounted(self.mnt):
            print(f"bench_rw: {self.tool}: {self.mnt} still mounted; umount -l",
                  file=sys.stderr)
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def leftover_mounts(root: Path) -> list[str]:
    """Mount points at or under root, from /proc/self/mountinfo."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4].replace("\\040", " ")
            if mp == str(root) or mp.startswith(prefix):
                found.append(mp)
    return found


def detach_leftovers(root: Path, who: str) -> None:
    """Detach (umount -l) every mount left at or under root, and say which."""
    left = leftover_mounts(root)
    for mp in reversed(left):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    if left:
        print(f"{who}: detached mounts left behind: {', '.join(left)}", file=sys.stderr)


def write_small(mnt: Path, name: str = "small") -> list[str]:
    return [sys.executable, "-c", WRITE_SMALL, str(mnt / name), str(SMALL_FILES)]


GROUPS = ("dd", "small", "tarx", "git", "commit")


def measure_rw(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
               timed: Callable[..., None], only: frozenset[str] = frozenset(GROUPS)) -> None:
    """The rw rows, or only the groups named in `only` (see GROUPS)."""
    name, short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    try:
        with environment(b.work, ENV, GIT_ENV):
            _measure(b, name, short, src, imagefs, timed, only)
    finally:
        detach_leftovers(b.work, "bench_rw")
        for d in ("rwbig", "ovl", "plainrw", "rw-state", "rw-run"):
            shutil.rmtree(b.work / d, ignore_errors=True)
        for f in ("rw-tree.tar", "rw-commit.imagefs", "rw-commit.wim"):
            (b.work / f).unlink(missing_ok=True)


def _measure(b: Any, name: str, short: str, src: Path, imagefs: str,
             timed: Callable[..., None], only: frozenset[str]) -> None:
    # The image and WIM of the tree: bench.py's, or made here when run alone.
    image, wim = f"{short}.imagefs", f"{short}.wim"
    if not (b.work / image).exists():
        b.run([imagefs, "capture", str(src), image, "--name", name]
              + (["--level", str(b.level)] if b.level is not None else []))
    if not (b.work / wim).exists() and "commit" in only:
        b.run(["wimcapture", str(src), wim, name, *WIM_OPTS])
    big = "rwbig/big.bin"
    if "dd" in only:
        make_big_tree(b.work / "rwbig")
    if "tarx" in only:
        b.run(["tar", "-cf", "rw-tree.tar", "--xattrs", "--xattrs-include=*",
               "--numeric-owner", "-C", str(src), "."])
    b.names.setdefault(str(src), short)

    def each_run(row_fn: Callable[[str, Path], None]) -> None:
        for _run, tool in ((r, t) for r in range(RUNS) for t in IO_PEERS):
            m = RwMount(b, tool, imagefs, src)
            try:
                row_fn(tool, m.open(image))
            finally:
                m.close()

    vs = [(OVERLAY, 0.5)]
    for source, label in (("/dev/zero", "/dev/zero"), (big, "semi-compressible file")):
        if "dd" not in only:
            break
        key = "zero" if source == "/dev/zero" else "file"
        row = b.row(f"rw.dd.{key}", f"rw: dd 1 GiB from {label}, conv=fsync (MB/s)", "MB/s",
                    targets=vs, higher_is_better=True)

        def dd(tool: str, mnt: Path, row: Any = row, source: str = source) -> None:
            seconds = shell(b, f"dd if={source} of={mnt}/big bs=1M count={BIG_SIZE >> 20} "
                               "conv=fsync status=none")
            timed(row, tool, BIG_SIZE / 1e6 / seconds)
        each_run(dd)

    if "small" in only:
        _measure_small(b, each_run, timed)
    if "tarx" in only:
        _measure_tarx(b, name, each_run, timed)
    if "git" in only:
        _measure_git(b, name, src, each_run, timed)
    if "commit" in only:
        _measure_commit(b, src, image, wim, imagefs, timed)


def _measure_small(b: Any, each_run: Callable[..., None], timed: Callable[..., None]) -> None:
    small = b.row("rw.small", f"rw: create-write-close {SMALL_FILES} files of 100 B (s)", "s",
                  targets=[(OVERLAY, 2.0)])
    each_run(lambda tool, mnt: timed(small, tool, b.run(write_small(mnt))))


def _measure_tarx(b: Any, name: str, each_run: Callable[..., None],
                  timed: Callable[..., None]) -> None:
    tar = b.row(f"rw.tarx.{name}", f"rw: tar -x of {name} into an empty dir (s)", "s",
                targets=[(OVERLAY, 2.0)])

    def untar(tool: str, mnt: Path) -> None:
        (b.work / mnt / "tarx").mkdir()
        timed(tar, tool, b.run(["tar", "-xf", "rw-tree.tar", "--xattrs", "--xattrs-include=*",
                                "--numeric-owner", "-C", str(mnt / "tarx")]))
    each_run(untar)


def _measure_git(b: Any, name: str, src: Path, each_run: Callable[..., None],
                 timed: Callable[..., None]) -> None:
    copy = b.row("rw.git.copy", f"rw: cp -a {GIT_SUBTREE} of {name} into the mount (s)", "s",
                 in_table=False)
    git = b.row("rw.git", f"rw: git init, add -A, commit of {GIT_SUBTREE} (s)", "s")

    def git_commit(tool: str, mnt: Path) -> None:
        repo = shlex.quote(str(mnt / "repo"))
        timed(copy, tool, shell(b, f"mkdir {repo} && cp -a {src}/{GIT_SUBTREE}/. {repo}/"))
        timed(git, tool, shell(b, f"cd {repo} && git init -q && git add -A && "
                                  "git commit -qm x"))
    each_run(git_commit)


def _measure_commit(b: Any, src: Path, image: str, wim: str, imagefs: str,
                    timed: Callable[..., None]) -> None:
    # Commit: one changed file, then SMALL_FILES new files, on fresh copies of the images.
    one = b.row("rw.commit.1", "rw: commit 1 changed file (s)", "s",
                targets=[("abs", 0.5), ("wimlib", 0.5)])
    many = b.row("rw.commit.many", f"rw: commit {SMALL_FILES} new files (s)", "s")
    for _run, tool in ((r, t) for r in range(RUNS) for t in COMMIT_PEERS):
        copy_of = "rw-commit.imagefs" if tool == "imagefs" else "rw-commit.wim"
        shutil.copyfile(b.work / (image if tool == "imagefs" else wim), b.work / copy_of)
        m = RwMount(b, tool, imagefs, src)
        try:
            mnt = m.open(copy_of)
            shell(b, f"echo bench >>{mnt}/etc/hostname")
            timed(one, tool, m.commit())
            if tool == "wimlib":
                mnt = m.open(copy_of)
            b.run(write_small(mnt))
            timed(many, tool, m.commit())
        finally:
            m.close()


def main() -> int:
    """Run the rw rows alone on bookworm-minbase, with bench.py's table."""
    import argparse

    import bench  # not at the top: bench.py imports this module

    ap = argparse.ArgumentParser(prog="scripts/bench_rw.py", description=__doc__.split("\n")[0])
    ap.add_argument("--level", type=int, help="zstd level for imagefs capture")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    ap.add_argument("--only", metavar="GROUPS", default=",".join(GROUPS),
                    help=f"comma-separated groups of rows to run (of {','.join(GROUPS)})")
    args = ap.parse_args()
    only = frozenset(g for g in args.only.split(",") if g)
    if not only or only - set(GROUPS):
        ap.error(f"--only: groups are {', '.join(GROUPS)}")
    return bench.run_alone(
        "bench-rw", ("fuse-overlayfs", "fusermount3", "wimcapture", "wimmountrw", "wimunmount",
                     "git", "tar"),
        "imagefs rw benchmark; wimlib = wimmountrw + wimunmount --commit, plain = an empty "
        "directory on the work dir's disk",
        lambda b, trees: measure_rw(b, trees, str(bench.IMAGEFS), bench.timed, only),
        args.level, args.json)


if __name__ == "__main__":
    sys.exit(main())
