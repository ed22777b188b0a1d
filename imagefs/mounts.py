"""Mounts as an admin sees them: start one, list them, unmount one.

A mount is a process serving FUSE.  `imagefs mount` opens the image and the index in the
calling process (so every error is reported there, with its exit code), then forks the
mount process, which mounts, writes its record and says "ready" over a pipe; only then does
the command return, like wimmount.  The record (RUN_DIR/mounts/<key>.json, written by
rename) says which image and index are served where, by which pid, and where the log is;
/proc/self/mountinfo is the truth about what is mounted, so a record whose mount is gone is
dropped when mounts are listed.

Unmounting is a plain umount(2) (fusermount3 -u when not root): when processes still use
the mount it is refused and they are named, as `fuser -m` would.  The mount process then
sees its session end, closes and exits; SIGTERM, SIGINT and SIGHUP make it unmount itself
(lazily, so nothing is left mounted even if busy), and a guardian it forks detaches the mount
if it dies any other way (fuse.start_guardian).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from .container import now_iso
from .errors import (
    AlreadyMounted,
    BadMountPoint,
    Error,
    MountFailed,
    MountPointBusy,
    NotAMountPoint,
    SystemFailure,
    UsageError,
)

FSTYPE = "fuse.imagefs"
DEFAULT_CACHE = 256 << 20  # decompressed packs
META_CACHE = 24 << 20  # decompressed metadata blocks
INODE_CACHE_WEIGHT = 32_768  # decoded records, weighed by their extents and entries
log = logging.getLogger("imagefs.mount")


# --- what the kernel has mounted ---------------------------------------------------------

@dataclass(frozen=True)
class KernelMount:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor", the bdi name


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = bytearray()
    raw = os.fsencode(field_)
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def kernel_mounts() -> list[KernelMount]:
    found = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            parts = os.fsdecode(line.rstrip(b"\n")).split(" ")
            try:
                sep = parts.index("-", 6)
            except ValueError:
                continue
            found.append(KernelMount(_unescape(parts[4]), parts[sep + 1],
                                     _unescape(parts[sep + 2]), parts[2]))
    return found


def canonical(path: str) -> str:
    """An absolute path with the parent's symlinks resolved, without touching path itself
    (a dead FUSE mount answers ENOTCONN to stat)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)) \
        if path != "/" else "/"


def find_mount(path: str) -> KernelMount | None:
    """The topmost mount at exactly path."""
    path = canonical(path)
    hit = None
    for m in kernel_mounts():
        if m.mountpoint == path:
            hit = m
    return hit


# --- records -----------------------------------------------------------------------------

def run_dir() -> str:
    env = os.environ.get("IMAGEFS_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/imagefs"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "imagefs") if xdg else f"/tmp/imagefs-{os.geteuid()}"


def _records_dir() -> str:
    d = os.path.join(run_dir(), "mounts")
    os.makedirs(d, mode=0o755, exist_ok=True)
    return d


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


@dataclass
class MountRecord:
    image: str
    index: int
    name: str
    mountpoint: str
    pid: int
    mode: str = "ro"
    started: str = ""
    log: str = ""
    state: str = "mounted"  # mounted; dead (process gone, mount left); unregistered

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def record_path(self) -> str:
        return os.path.join(_records_dir(), _key(self.mountpoint) + ".json")

    def save(self) -> None:
        tmp = f"{self.record_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.to_json(), fh)
        os.replace(tmp, self.record_path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path)


def _load_record(path: str) -> MountRecord | None:
    try:
        with open(path) as fh:
            doc = json.load(fh)
        return MountRecord(**{k: v for k, v in doc.items()
                              if k in MountRecord.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def record_for(mountpoint: str) -> MountRecord | None:
    return _load_record(os.path.join(_records_dir(), _key(canonical(mountpoint)) + ".json"))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def list_mounts() -> list[MountRecord]:
    """Every imagefs mount: the recorded ones (records of vanished mounts are dropped) and
    any other fuse.imagefs mount the kernel shows."""
    mounted = {m.mountpoint: m for m in kernel_mounts() if m.fstype == FSTYPE}
    out = []
    d = _records_dir()
    for fname in sorted(os.listdir(d)):
        if not fname.endswith(".json"):
            continue
        rec = _load_record(os.path.join(d, fname))
        if rec is None:
            continue
        alive = pid_alive(rec.pid)
        if rec.mountpoint not in mounted:
            if not alive:
                rec.remove()
            continue
        rec.state = "mounted" if alive else "dead"
        out.append(rec)
        del mounted[rec.mountpoint]
    for m in mounted.values():
        out.append(MountRecord(image=m.source, index=0, name="", mountpoint=m.mountpoint,
                               pid=0, state="unregistered"))
    return out


# --- mounting ----------------------------------------------------------------------------

def parse_options(specs: list[str]) -> tuple[list[str], int]:
    """-o values → (FUSE options, pack cache bytes).  cache=SIZE is ours; `rw` is refused
    (writable mounts are sessions, `--rw`)."""
    fuse_opts: list[str] = []
    cache = DEFAULT_CACHE
    for spec in specs:
        for opt in (o.strip() for o in spec.split(",")):
            if not opt:
                continue
            if opt.startswith("cache="):
                cache = parse_size(opt[6:])
            elif opt == "rw":
                raise UsageError("-o rw: this mount is read-only")
            elif opt == "ro":
                continue
            else:
                fuse_opts.append(opt)
    return fuse_opts, cache


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"{text!r}: not a size (examples: 512M, 2G)") from None
    if value < 1 << 20:
        raise UsageError(f"cache={text}: the chunk cache needs at least 1M")
    return value


def check_mountpoint(mountpoint: str) -> str:
    path = canonical(mountpoint)
    existing = find_mount(path)
    if existing is not None and existing.fstype == FSTYPE:
        raise AlreadyMounted(path, existing.source)
    if not os.path.isdir(path):
        raise BadMountPoint(path, "not an existing directory")
    return path


def start(image_path: str, index_spec: str, mountpoint: str, option_specs: list[str],
          foreground: bool = False,
          announce: Callable[[MountRecord], None] | None = None) -> MountRecord:
    """Mount an index read-only at mountpoint.  In the background (the default) this
    returns once the mount is ready; with foreground it returns after unmount."""
    from .fuse import ReadOnlyOperations, mount_options
    from .image import Image
    from .packs import PackReader
    from .records import MetaReader
    from .vfs import IndexTree
    from .view import IndexView

    fuse_opts, cache = parse_options(option_specs)
    path = check_mountpoint(mountpoint)
    img = Image.open(image_path)
    number, entry = img.select(index_spec)
    # The kernel caches what it was given (entries, attributes, pages), so the driver's own
    # metadata caches can stay small: 500 000 files are walked in well under 150 MB.
    view = IndexView(img.file, number, entry, meta=MetaReader(img.file, META_CACHE),
                     packs=PackReader(img.file, cache_bytes=cache))
    tree = IndexTree(view, inode_cache_weight=INODE_CACHE_WEIGHT)
    image_abs = os.path.abspath(image_path)
    label = f"image {image_abs} index {number} ({entry.name})"
    ops = ReadOnlyOperations(tree, label)
    opts = mount_options(image_abs, fuse_opts)
    rec = MountRecord(image=image_abs, index=number, name=entry.name, mountpoint=path,
                      pid=os.getpid(), started=now_iso())
    rec.log = os.path.join(_records_dir(), _key(path) + ".log")

    if foreground:
        _log_to(sys.stderr)

        def ready_fg() -> None:
            rec.log = ""
            rec.save()
            log.info("%s mounted read-only at %s", label, path)
            if announce:
                announce(rec)

        try:
            _serve_or_fail(ops, path, opts, ready_fg, None)
        finally:
            rec.remove()
        return rec

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(r)
        code = 0
        try:
            _become_daemon(rec.log)
            rec.pid = os.getpid()

            def ready_bg() -> None:
                rec.save()
                log.info("%s mounted read-only at %s", label, path)
                os.write(w, b"ok\n")
                os.close(w)

            _serve_or_fail(ops, path, opts, ready_bg, w)
        except BaseException:
            code = 1
        finally:
            rec.remove()
            logging.shutdown()
            os._exit(code)
    os.close(w)
    reply = b""
    while chunk := os.read(r, 4096):
        reply += chunk
    os.close(r)
    img.close()
    if reply.startswith(b"ok"):
        rec.pid = pid
        return rec
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if reply.startswith(b"err "):
        code_s, _, message = reply[4:].decode("utf-8", "replace").partition("\t")
        if code_s == str(UsageError.exit_code):
            raise UsageError(f"{path}: {message.strip()}")
        raise MountFailed(path, message.strip())
    raise MountFailed(path, f"the mount process died before it was ready; see {rec.log}")


def _serve_or_fail(ops: object, path: str, opts: set[str], ready: Callable[[], None],
                   fail_fd: int | None) -> None:
    from .fuse import serve

    ready_called = False

    def ready_once() -> None:
        nonlocal ready_called
        ready_called = True
        ready()

    try:
        serve(ops, path, opts, ready_once)  # type: ignore[arg-type]
    except BaseException as e:
        if ready_called:
            log.exception("mount process failed")
            raise
        message, code = _mount_failure(e)
        if fail_fd is None:
            if code == UsageError.exit_code:
                raise UsageError(f"{path}: {message}") from None
            raise MountFailed(path, message) from None
        os.write(fail_fd, f"err {code}\t{message}\n".encode())
        raise


def _mount_failure(e: BaseException) -> tuple[str, int]:
    if isinstance(e, Error):
        return e.message(), e.exit_code
    if isinstance(e, RuntimeError) and "fuse_session_new" in str(e):
        return "FUSE refused the mount options (see -o)", UsageError.exit_code
    if isinstance(e, RuntimeError) and "fuse_session_mount" in str(e):
        if not os.path.exists("/dev/fuse"):
            return "FUSE is not available: /dev/fuse is missing (modprobe fuse)", \
                SystemFailure.exit_code
        return "the kernel refused the mount (permissions, or FUSE unavailable)", \
            SystemFailure.exit_code
    return f"{type(e).__name__}: {e}", SystemFailure.exit_code


def _log_to(stream: TextIO) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("imagefs[%(process)d]: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def _become_daemon(log_path: str) -> None:
    """Detach from the terminal and the caller's session; stdio → /dev/null and the log."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)
    os.chdir("/")
    sys.stderr = os.fdopen(2, "w", buffering=1)
    _log_to(sys.stderr)


# --- unmounting --------------------------------------------------------------------------

def holders(mountpoint: str) -> list[tuple[int, str, str]]:
    """(pid, command, how) of each process using a path under mountpoint."""
    prefix = mountpoint.rstrip("/") + "/"

    def inside(p: str) -> bool:
        return p == mountpoint or p.startswith(prefix)

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        hows = []
        for link, how in (("cwd", "working directory"), ("root", "root directory"),
                          ("exe", "program")):
            with contextlib.suppress(OSError):
                if inside(os.readlink(f"{base}/{link}")):
                    hows.append(how)
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    if inside(os.readlink(f"{base}/fd/{fd}")):
                        hows.append("open file")
                        break
        if hows:
            try:
                with open(f"{base}/comm") as fh:
                    comm = fh.read().strip()
            except OSError:
                comm = "?"
            found.append((int(entry), comm, ", ".join(hows)))
    return found


def unmount(mountpoint: str, wait: float = 30.0) -> MountRecord:
    """Unmount an imagefs mount; refuse (naming the holders) while it is in use."""
    path = canonical(mountpoint)
    m = find_mount(path)
    if m is None or m.fstype != FSTYPE:
        raise NotAMountPoint(path)
    rec = record_for(path) or MountRecord(image=m.source, index=0, name="", mountpoint=path,
                                          pid=0, state="unregistered")
    err = _umount(path)
    if err == errno.EBUSY:
        who = holders(path)
        if who:
            named = "; ".join(f"pid {p} ({c}: {h})" for p, c, h in who)
            raise MountPointBusy(path, f"in use by {named}")
        raise MountPointBusy(path, "in use (by a process in another namespace, or a mount "
                                   "inside it)")
    if err:
        raise SystemFailure(path, f"umount failed: {os.strerror(err)}")
    deadline = time.monotonic() + wait
    while rec.pid and pid_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.remove()
    return rec


def _umount(path: str) -> int:
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), 0) != 0:
            return ctypes.get_errno()
        return 0
    proc = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
    if proc.returncode == 0:
        return 0
    return errno.EBUSY if "busy" in proc.stderr.lower() else errno.EPERM
