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
    SessionLive,
    SystemFailure,
    UsageError,
)
from .places import run_dir
from .sessions import SessionInfo, discard

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
    state: str = "mounted"  # mounted; dead (process gone, mount left); unregistered;
    # writable mounts: live, or stale (the process is gone; `imagefs remount` it)
    session: str = ""
    staged_bytes: int = 0

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
    return out + _sessions(out)


def _sessions(mounts: list[MountRecord]) -> list[MountRecord]:
    """Writable mounts' states (live) and the sessions no process serves (stale)."""
    from .sessions import list_sessions

    by_session = {m.session: m for m in mounts if m.session}
    stale = []
    for info in list_sessions():
        rec = by_session.get(info.id)
        if rec is not None:  # still mounted: live, or its process died (stale)
            rec.state = "live" if info.live() else "stale"
            rec.staged_bytes = info.staged_bytes()
            continue
        stale.append(MountRecord(image=info.image, index=info.index, name=info.name,
                                 mountpoint=info.mountpoint, pid=0, mode="rw",
                                 started=info.created, state="stale", session=info.id,
                                 staged_bytes=info.staged_bytes()))
    return stale


# --- mounting ----------------------------------------------------------------------------

def parse_options(specs: list[str], writable: bool = False) -> tuple[list[str], int]:
    """-o values → (FUSE options, pack cache bytes).  cache=SIZE is ours; `rw` and `ro`
    are --rw's business (writable mounts are sessions)."""
    fuse_opts: list[str] = []
    cache = DEFAULT_CACHE
    for spec in specs:
        for opt in (o.strip() for o in spec.split(",")):
            if not opt:
                continue
            if opt.startswith("cache="):
                cache = parse_size(opt[6:])
            elif opt == ("ro" if writable else "rw"):
                raise UsageError(f"-o {opt}: this mount is "
                                 f"{'writable (--rw)' if writable else 'read-only'}; "
                                 f"{'drop --rw' if writable else 'use --rw for a session'}")
            elif opt in ("ro", "rw"):
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
    if existing is not None and existing.fstype == FSTYPE and _dead(path):
        # Its process died; its guardian detaches it, but perhaps not yet: do it now.
        _umount(path, lazy=True)
        existing = find_mount(path)
    if existing is not None and existing.fstype == FSTYPE:
        raise AlreadyMounted(path, existing.source)
    if not os.path.isdir(path):
        raise BadMountPoint(path, "not an existing directory")
    return path


def start(image_path: str, index_spec: str, mountpoint: str, option_specs: list[str],
          foreground: bool = False,
          announce: Callable[[MountRecord], None] | None = None,
          writable: bool = False, session: SessionInfo | None = None,
          not_inherited: tuple[int, ...] = ()) -> MountRecord:
    """Mount an index at mountpoint: read-only, or writable as a session (a new one, or
    `session` again after a crash).  In the background (the default) this returns once
    the mount is ready; with foreground it returns after unmount.  The mount process
    closes the descriptors in not_inherited (the caller's, not the mount's to hold)."""
    fuse_opts, cache = parse_options(option_specs, writable or session is not None)
    path = check_mountpoint(mountpoint)
    if writable or session is not None:
        mount = _writable(image_path, index_spec, path, cache, session)
    else:
        mount = _read_only(image_path, index_spec, cache)
    from .fuse import mount_options

    opts = mount_options(mount.rec.image, fuse_opts, writable=mount.rec.mode == "rw")
    rec = mount.rec
    rec.mountpoint = path
    rec.pid = os.getpid()
    rec.started = now_iso()
    rec.log = os.path.join(_records_dir(), _key(path) + ".log")
    how = f"writable (session {rec.session})" if rec.session else "read-only"

    def announce_ready() -> None:
        rec.save()
        mount.ready(rec)
        log.info("%s mounted %s at %s", mount.label, how, path)

    if foreground:
        _log_to(sys.stderr)

        def ready_fg() -> None:
            rec.log = ""
            announce_ready()
            if announce:
                announce(rec)

        try:
            _serve_or_fail(mount.make_ops, path, opts, ready_fg, None)
        except BaseException:
            mount.failed()
            raise
        finally:
            rec.remove()
            mount.ended()
        return rec

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the mount process
        os.close(r)
        for fd in not_inherited:
            os.close(fd)
        code = 0
        try:
            _become_daemon(rec.log)
            _set_title(f"imagefs mount {rec.image} {rec.index} {path}")
            rec.pid = os.getpid()

            def ready_bg() -> None:
                announce_ready()
                os.write(w, b"ok\n")
                os.close(w)

            _serve_or_fail(mount.make_ops, path, opts, ready_bg, w)
        except BaseException:
            code = 1
        finally:
            rec.remove()
            mount.ended()
            logging.shutdown()
            os._exit(code)
    os.close(w)
    reply = b""
    while chunk := os.read(r, 4096):
        reply += chunk
    os.close(r)
    mount.parent_done()
    if reply.startswith(b"ok"):
        rec.pid = pid
        return rec
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    mount.failed()
    if reply.startswith(b"err "):
        code_s, _, message = reply[4:].decode("utf-8", "replace").partition("\t")
        if code_s == str(UsageError.exit_code):
            raise UsageError(f"{path}: {message.strip()}")
        raise MountFailed(path, message.strip())
    raise MountFailed(path, f"the mount process died before it was ready; see {rec.log}")


@dataclass
class _Mount:
    """What start() needs of either kind of mount."""

    rec: MountRecord
    label: str
    make_ops: Callable[[], object]
    ready: Callable[[MountRecord], None] = lambda rec: None
    ended: Callable[[], None] = lambda: None
    failed: Callable[[], None] = lambda: None  # it never became ready
    parent_done: Callable[[], None] = lambda: None


def _read_only(image_path: str, index_spec: str, cache: int) -> _Mount:
    from .fuse import ReadOnlyOperations
    from .image import Image
    from .packs import PackReader
    from .records import MetaReader
    from .vfs import IndexTree
    from .view import IndexView

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
    rec = MountRecord(image=image_abs, index=number, name=entry.name, mountpoint="", pid=0)
    return _Mount(rec, label, lambda: ops, parent_done=img.close)


def _writable(image_path: str, index_spec: str, mountpoint: str, cache: int,
              session: SessionInfo | None) -> _Mount:
    """A session's mount.  The parent checks everything it can (and creates a new
    session's staging); the mount process opens the session again for itself (an SQLite
    connection must not cross a fork)."""
    from .sessions import Session

    if session is not None:
        if session.live():
            raise SessionLive(session.id, session.pid, session.mountpoint)
        Session.load(session, cache).close()
        info, created = session, False
    else:
        new = Session.create(image_path, index_spec, mountpoint, cache)
        new.close()
        info, created = new.info, True
    label = f"image {info.image} index {info.index} ({info.name}) session {info.id}"
    rec = MountRecord(image=info.image, index=info.index, name=info.name, mountpoint="",
                      pid=0, mode="rw", session=info.id)

    def make_ops() -> object:
        from .fuse_rw import WritableOperations

        return WritableOperations(Session.load(info, cache), label)

    def ready(rec: MountRecord) -> None:
        info.pid = rec.pid
        info.mountpoint = mountpoint
        info.save()

    def ended() -> None:
        with contextlib.suppress(OSError):
            fresh = SessionInfo.load(info.id)
            if fresh.pid == os.getpid():
                fresh.pid = 0
                fresh.save()

    def failed() -> None:
        if created:
            with contextlib.suppress(Exception):
                discard(SessionInfo.load(info.id))

    return _Mount(rec, label, make_ops, ready=ready, ended=ended, failed=failed)


def _serve_or_fail(make_ops: Callable[[], object], path: str, opts: set[str],
                   ready: Callable[[], None], fail_fd: int | None) -> None:
    from .fuse import serve

    ready_called = False

    def ready_once() -> None:
        nonlocal ready_called
        ready_called = True
        ready()

    try:
        serve(make_ops(), path, opts, ready_once)  # type: ignore[arg-type]
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


def _set_title(title: str) -> None:
    """What ps and fuser show for a mount process (else whatever command forked it)."""
    from setproctitle import setproctitle

    setproctitle(title)


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


def unmount(mountpoint: str, wait: float = 30.0, commit: bool = False,
            discard_changes: bool = False, new_index: str | None = None
            ) -> tuple[MountRecord, dict[str, object] | None]:
    """Unmount an imagefs mount; refuse (naming the holders) while it is in use.  A
    writable mount must be told what becomes of its changes: commit them first (then the
    session ends), or discard them with the session."""
    path = canonical(mountpoint)
    m = find_mount(path)
    if m is None or m.fstype != FSTYPE:
        raise NotAMountPoint(path)
    rec = record_for(path) or MountRecord(image=m.source, index=0, name="", mountpoint=path,
                                          pid=0, state="unregistered")
    result = None
    if commit and discard_changes:
        raise UsageError("--commit and --discard contradict each other; choose one")
    if rec.mode == "rw":
        if not commit and not discard_changes:
            raise UsageError(f"{path} is a writable mount (session {rec.session}): "
                             "unmount --commit to publish its changes, or --discard to "
                             "drop them")
        from .control import request

        if commit:
            result = request(rec.session, {"op": "commit", "new_index": new_index})
        else:
            with contextlib.suppress(Error):  # a mount that does not answer still goes
                request(rec.session, {"op": "discard"}, timeout=5)
    elif commit or new_index:
        raise UsageError(f"{path} is a read-only mount: there is nothing to commit")
    err = _umount(path)
    if err == errno.EBUSY:
        done = "changes committed, but " if result else ""
        who = holders(path)
        if who:
            named = "; ".join(f"pid {p} ({c}: {h})" for p, c, h in who)
            raise MountPointBusy(path, f"{done}in use by {named}")
        raise MountPointBusy(path, f"{done}in use (by a process in another namespace, or a "
                                   "mount inside it)")
    if err:
        raise SystemFailure(path, f"umount failed: {os.strerror(err)}")
    deadline = time.monotonic() + wait
    while rec.pid and pid_alive(rec.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.remove()
    if rec.session:  # committed or discarded: the session is over
        discard(SessionInfo.load(rec.session))
    return rec, result


def commit(spec: str, new_index: str | None = None, wait: float | None = None,
           who: dict[str, object] | None = None) -> tuple[SessionInfo, dict[str, object]]:
    """Commit a session's changes, by mountpoint or session id: through its mount process
    when it is mounted, directly when the session is stale."""
    from .sessions import Session, find_session

    info = find_session(spec)
    if info.live():
        from .control import request

        return info, request(info.id, {"op": "commit", "new_index": new_index, "wait": wait,
                                       "who": who})
    session = Session.load(info)
    try:
        return info, session.commit(new_index, wait=wait, who=who)
    finally:
        session.close()


def cleanup(spec: str | None) -> list[SessionInfo]:
    """Discard stale sessions (one, or all of them with spec None) and their staging."""
    from .sessions import find_session, list_sessions

    if spec is not None:
        info = find_session(spec)
        discard(info)
        return [info]
    gone = []
    for info in list_sessions():
        if not info.live():
            discard(info)
            gone.append(info)
    return gone


def _dead(path: str) -> bool:
    """A FUSE mount whose server is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def _umount(path: str, lazy: bool = False) -> int:
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(path), 2 if lazy else 0) != 0:  # 2: MNT_DETACH
            return ctypes.get_errno()
        return 0
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode == 0:
        return 0
    return errno.EBUSY if "busy" in proc.stderr.lower() else errno.EPERM
