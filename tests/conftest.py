"""Shared test helpers and fixtures.

Plain functions (importable: `from conftest import run_imagefs, rsync_diff, fixture_tree`)
and fixtures of the same names (for tests that prefer arguments):

- run_imagefs(*args, check=True, input=None) -> CompletedProcess (bytes stdout/stderr):
  `python -m imagefs.cli ARGS`; never a traceback on stderr; with check, exit 0 required.
- fixture_tree(name) -> Path: an extracted real Debian root (bookworm-minbase,
  bookworm-web).  Read-only: copy what you change.
- rsync_diff(src, dst) -> str: rsync's itemized differences of two trees (content,
  owners, modes, nanosecond mtimes, hardlinks, ACLs, xattrs, devices); "" means equal.
- data_regions(path), assert_same_tree(src, dst, sparse_files=()): see their docstrings.

- mounted(image, index, mountpoint, *options, env=None): a context manager that mounts
  with `imagefs mount --json`, yields the mount's record (dict: pid, log, ...) and always
  unmounts, also when the test fails (see unmount_hard); mounted_rw does the same with
  --rw (a session, discarded at the end unless committed).  kill_mount(rec) SIGKILLs one.

- public_dir(prefix) -> Path: a directory under /tmp that every uid may enter (pytest's
  tmp_path is root's 0700), removed when the test ends.

Every test session gets its own IMAGEFS_RUN_DIR (mount records and logs) and
IMAGEFS_STATE_DIR (sessions), removed at its end; then any fuse.imagefs mount under the
session's temp directories is unmounted and reported.  Tests leave nothing in /tmp.

Session fixtures: minbase_slice (a copy of parts of bookworm-minbase), every_type_tree
(tests/treegen.py), many_files_image (an image whose index 1 "many" holds 1000
directories /dNNNN x 500 files fNNNNN, built with the writer API in ~20 s), minbase_image
(bookworm-minbase captured as index "minbase") and minbase_two_image (captured twice, as
"one" and "two"): the servicing tests copy them (copy_image) instead of capturing the
fixture again in every module.  All are shared: never modify them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_zygote  # noqa: E402
from treegen import build_many_files_image, make_every_type_tree  # noqa: E402

StrPath = str | bytes | os.PathLike


def run_imagefs(*args: StrPath, check: bool = True, input: bytes | None = None,
                env: dict[str, str] | None = None, timeout: float = 600,
                ) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI in a child process (`python -m imagefs.cli ARGS`, forked from a zygote
    that skips Python's start-up: tests/cli_zygote.py); stdout and stderr are bytes."""
    proc = cli_zygote.run([os.fsdecode(a) for a in args], input=input,
                          env={**os.environ, **(env or {})} if env else None,
                          timeout=timeout)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, f"traceback from imagefs {args!r}:\n{err}"
    if check:
        assert proc.returncode == 0, (
            f"imagefs {args!r} exited {proc.returncode}:\n{err}")
    return proc


@functools.cache
def fixture_tree(name: str) -> Path:
    """The path of an extracted fixture tree (scripts/fixture-tree NAME; cached)."""
    out = subprocess.run([str(REPO / "scripts" / "fixture-tree"), name],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/fixture-tree {name} failed:\n{out.stderr}")
    path = Path(out.stdout.strip())
    assert path.is_dir(), path
    return path


def rsync_diff(src: StrPath, dst: StrPath, ns: bool = True, checksum: bool = True,
               extra: list[str] | None = None) -> str:
    """`rsync -aHAXc --dry-run --itemize-changes --no-inc-recursive SRC/ DST/`.

    With ns (the default) `--modify-window=-1` is added so that mtimes are compared to the
    nanosecond (rsync's default compares whole seconds only).  checksum=False drops -c
    (content is then compared by size and mtime only); extra: more rsync options, e.g.
    ["--exclude=/big.img"]."""
    s = os.fsencode(src).rstrip(b"/") + b"/"
    d = os.fsencode(dst).rstrip(b"/") + b"/"
    argv: list[str | bytes] = ["rsync", "-aHAXc" if checksum else "-aHAX", "--dry-run",
                               "--itemize-changes", "--no-inc-recursive"]
    if ns:
        argv.append("--modify-window=-1")
    argv += [*(extra or []), s, d]
    proc = subprocess.run(argv, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode(errors="backslashreplace")


def data_regions(path: StrPath) -> list[tuple[int, int]]:
    """[(start, end)] of the data (non-hole) regions of a file, by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def assert_same_tree(src: StrPath, dst: StrPath, sparse_files: tuple[bytes, ...] = ()
                     ) -> None:
    """src and dst are equal in content and every piece of metadata (rsync_diff empty).

    sparse_files (paths relative to the roots) are huge sparse files: instead of letting
    rsync -c read gigabytes of holes, their data regions are compared (same map, same
    bytes); their metadata is still compared by rsync."""
    excludes = [f"--exclude=/{os.fsdecode(p)}" for p in sparse_files]
    diff = rsync_diff(src, dst, extra=excludes)
    assert diff == "", f"trees differ ({src} -> {dst}):\n{diff}"
    if sparse_files:
        diff = rsync_diff(src, dst, checksum=False)
        assert diff == "", f"trees differ ({src} -> {dst}):\n{diff}"
    for rel in sparse_files:
        a = os.fsencode(src) + b"/" + rel
        b = os.fsencode(dst) + b"/" + rel
        regions = data_regions(a)
        assert data_regions(b) == regions, f"{rel!r}: holes differ"
        with open(a, "rb") as fa, open(b, "rb") as fb:
            for start, end in regions:
                fa.seek(start)
                fb.seek(start)
                assert fa.read(end - start) == fb.read(end - start), (
                    f"{rel!r}: data at {start} differs")


def kernel_imagefs_mounts() -> list[str]:
    """Mount points of every fuse.imagefs mount the kernel shows."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split(" ")
            sep = parts.index("-", 6)
            if parts[sep + 1] == "fuse.imagefs":
                found.append(parts[4].replace("\\040", " "))
    return found


def is_mounted(mountpoint: StrPath) -> bool:
    return os.path.abspath(os.fsdecode(mountpoint)) in kernel_imagefs_mounts()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def wait_until(cond, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def unmount_hard(mountpoint: StrPath, pid: int | None) -> None:
    """Unmount by every means there is: `imagefs unmount`, then SIGTERM to the mount
    process we started (it unmounts lazily), then a lazy umount; wait for the pid."""
    mnt = os.path.abspath(os.fsdecode(mountpoint))
    if is_mounted(mnt):  # --discard: a writable mount's session goes with it
        run_imagefs("unmount", mnt, "--discard", check=False, timeout=60)
    if pid and pid_alive(pid) and is_mounted(mnt):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not is_mounted(mnt), 10)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    if pid:
        wait_until(lambda: not pid_alive(pid), 10)


def guardians_of(mountpoint: StrPath) -> list[int]:
    """Pids of the mount guardians (imagefs.mount.fuse.start_guardian) watching a mount at
    mountpoint, found by the title they give themselves."""
    title = b"imagefs mount guardian " + os.fsencode(os.path.abspath(os.fsdecode(mountpoint)))
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if cmdline.rstrip(b"\0") == title and pid_alive(int(name)):
                found.append(int(name))
    return found


def settle(mountpoint: StrPath, timeout: float = 10) -> None:
    """Before a new mount at a place where a mount just ended: wait until the guardian of
    that mount has ended too.  A guardian wakes when its mount process ends and detaches
    what is mounted there if its device number is its mount's; the kernel gives the next
    FUSE mount the same number at once, so a new mount made before the old guardian
    looked would be detached by it."""
    if not is_mounted(mountpoint):
        wait_until(lambda: not guardians_of(mountpoint), timeout)


@contextlib.contextmanager
def mounted(image: StrPath, index: StrPath, mountpoint: StrPath, *options: str,
            env: dict[str, str] | None = None) -> Iterator[dict]:
    """Mount an index (background), yield its record, always unmount."""
    os.makedirs(mountpoint, exist_ok=True)
    settle(mountpoint)
    proc = run_imagefs("mount", image, str(index), mountpoint, "--json", *options, env=env,
                       timeout=60)
    rec = json.loads(proc.stdout)
    try:
        yield rec
    finally:
        unmount_hard(mountpoint, rec.get("pid"))


@contextlib.contextmanager
def mounted_rw(image: StrPath, index: StrPath, mountpoint: StrPath, *options: str,
               env: dict[str, str] | None = None) -> Iterator[dict]:
    """Mount an index writable (a session), yield its record (pid, session, ...); always
    unmount, discarding what was not committed."""
    with mounted(image, index, mountpoint, "--rw", *options, env=env) as rec:
        yield rec


def servicing_leftovers() -> list[str]:
    """What servicing verbs of this test session left behind: mounts in their workspaces
    (RUN_DIR/servicing), processes running there (containers rooted at a workspace mount),
    and the workspaces themselves.  [] when all is clean."""
    import psutil

    from imagefs.places import run_dir

    base = os.path.join(run_dir(), "servicing")
    mounts = [m for m in kernel_imagefs_mounts() if m.startswith(base)]
    procs = [f"{p.pid} {' '.join(p.info['cmdline'])}"
             for p in psutil.process_iter(["cmdline"])
             if any(a.startswith(base + "/") for a in p.info["cmdline"] or [])]
    # A fork server dies with its verb, and a request it took ends once that mount is
    # made or failed: give them the moment that takes.
    wait_until(lambda: not orphan_fork_servers(), 10)
    return (mounts + procs + orphan_fork_servers()
            + (os.listdir(base) if os.path.isdir(base) else []))


def settled_after_a_kill() -> None:
    """After a servicing verb was SIGKILLed: its fork server, when it was answering a mount
    request, ends once that mount is made or failed (the mount may appear after the verb
    died), and every mount of the verb then ends on its own.  Wait for both, in that order,
    so that the cleanup that follows meets everything the verb will leave."""
    assert wait_until(lambda: not orphan_fork_servers(), 10), orphan_fork_servers()
    assert wait_until(lambda: not [m for m in kernel_imagefs_mounts()
                                   if "/servicing/" in m], 15)


def orphan_fork_servers() -> list[str]:
    """The fork servers of servicing verbs run without a daemon whose verb is gone, and
    their children still answering a mount request (they share the title): the server
    dies with its verb, SIGKILLed by the kernel, a child once its mount is made or failed
    (give them a moment: wait_until)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or []).strip()
        of = re.fullmatch(r"imagefs forkserver \(of pid (\d+)\)", title)
        if of is not None and not pid_alive(int(of.group(1))):
            found.append(f"{p.pid} {title}")
    return found


def kill_mount(rec: dict) -> None:
    """SIGKILL a mount process we started and wait until its mount is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec["pid"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(rec["pid"]), 10)
    assert wait_until(lambda: not is_mounted(rec["mountpoint"]), 10)


_public_dirs: list[Path] = []


def public_dir(prefix: str) -> Path:
    """A directory every uid may enter (pytest's tmp_path is root's 0700), removed at the
    end of the test that made it."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    _public_dirs.append(d)
    return d


@pytest.fixture(autouse=True)
def _public_dirs_removed() -> Iterator[None]:
    """Remove the test's public_dir()s; a mount left in one is unmounted and reported."""
    yield
    left = []
    while _public_dirs:
        d = _public_dirs.pop()
        inside = [m for m in kernel_imagefs_mounts() if m.startswith(f"{d}/")]
        for m in inside:
            unmount_hard(m, None)
        left += inside
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"the test left imagefs mounts behind: {left}"


def _compile_sources() -> None:
    """Write the bytecode of imagefs, daemon and servicing into their __pycache__ (what
    Python itself does where PYTHONDONTWRITEBYTECODE is not set): otherwise every command
    the tests run compiles every module of ours it imports, again (0.03-0.2 s each)."""
    import compileall

    for package in ("imagefs", "daemon", "servicing"):
        with contextlib.suppress(OSError):
            compileall.compile_dir(REPO / package, quiet=2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Mount records and logs of this session in a directory of its own; at the end no
    imagefs mount may be left under the session's temp directories."""
    run = tempfile.mkdtemp(prefix="imagefs-run-")
    old = os.environ.get("IMAGEFS_RUN_DIR")
    old_state = os.environ.get("IMAGEFS_STATE_DIR")
    os.environ["IMAGEFS_RUN_DIR"] = run
    os.environ["IMAGEFS_STATE_DIR"] = os.path.join(run, "state")  # sessions
    old_socket = os.environ.get("IMAGEFS_SOCKET")  # a daemon of the machine's is not asked
    os.environ["IMAGEFS_SOCKET"] = os.path.join(run, "no-daemon.sock")
    base = str(tmp_path_factory.getbasetemp())
    _compile_sources()
    cli_zygote.start()
    try:
        yield
    finally:
        cli_zygote.shutdown()
        left = [m for m in kernel_imagefs_mounts() if m.startswith((base, run))]
        for m in left:
            unmount_hard(m, None)
        for name, value in (("IMAGEFS_RUN_DIR", old), ("IMAGEFS_STATE_DIR", old_state),
                            ("IMAGEFS_SOCKET", old_socket)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not any(m.startswith(f"{run}/") for m in kernel_imagefs_mounts()):
            shutil.rmtree(run, ignore_errors=True)
        assert not left, f"tests left imagefs mounts behind: {left}"


@pytest.fixture(name="run_imagefs", scope="session")
def _run_imagefs_fixture():
    return run_imagefs


@pytest.fixture(name="fixture_tree", scope="session")
def _fixture_tree_fixture():
    return fixture_tree


@pytest.fixture(name="rsync_diff", scope="session")
def _rsync_diff_fixture():
    return rsync_diff


MINBASE_SLICE_PARTS = ("etc", "usr/bin", "usr/share/doc", "var/log", "dev")


@pytest.fixture(scope="session")
def minbase_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of etc/, usr/bin/, usr/share/doc/, var/log/ (ACLs on the journal dir) and
    dev/ (device nodes) of bookworm-minbase, paths kept.  Shared: do not modify."""
    src = fixture_tree("bookworm-minbase")
    dst = tmp_path_factory.mktemp("minbase-slice") / "root"
    dst.mkdir()
    # --relative keeps usr/bin as usr/bin; the ./ marks where the kept path starts.
    subprocess.run(["rsync", "-aHAX", "--relative",
                    *(f"{src}/./{p}" for p in MINBASE_SLICE_PARTS), f"{dst}/"],
                   check=True)
    # Parent directories rsync made (usr, usr/share, var) get the source's attributes.
    for p in ("usr", "usr/share", "var", "."):
        st = os.stat(src / p)
        os.chown(dst / p, st.st_uid, st.st_gid)
        os.chmod(dst / p, st.st_mode & 0o7777)
        os.utime(dst / p, ns=(st.st_atime_ns, st.st_mtime_ns))
    return dst


@pytest.fixture(scope="session")
def every_type_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/treegen.py's tree of every inode kind and metadata.  Shared: do not modify."""
    root = tmp_path_factory.mktemp("every-type") / "tree"
    return make_every_type_tree(root)


@pytest.fixture(scope="session")
def minbase_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase captured once for the session, as index 1 "minbase".  Shared:
    never change it; test modules take their own copy (copy_image)."""
    path = tmp_path_factory.mktemp("minbase-image") / "minbase.imagefs"
    run_imagefs("capture", fixture_tree("bookworm-minbase"), path, "--name", "minbase")
    return path


@pytest.fixture(scope="session")
def minbase_two_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase captured twice for the session: indices 1 (one) and 2 (two).
    Shared: never change it; test modules take their own copy (copy_image)."""
    path = tmp_path_factory.mktemp("minbase-two") / "two.imagefs"
    src = fixture_tree("bookworm-minbase")
    run_imagefs("capture", src, path, "--name", "one")
    run_imagefs("capture", src, path, "--name", "two")
    return path


def copy_image(src: Path, dst: Path) -> Path:
    """A copy of an image file (a shared session image made a module's or a test's own)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


MANY_DIRS = 1000
MANY_FILES_PER_DIR = 500


@pytest.fixture(scope="session")
def many_files_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image with one index ("many") of MANY_DIRS x MANY_FILES_PER_DIR = 500 000 small
    distinct files (treegen.build_many_files_image).  Shared: do not modify."""
    path = tmp_path_factory.mktemp("many-files") / "many.imagefs"
    build_many_files_image(path, MANY_DIRS, MANY_FILES_PER_DIR)
    return path
