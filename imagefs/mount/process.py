"""Mount processes: start one, and detach one.

A mount is a process serving FUSE.  `start` opens the image and the index in the calling
process (so every error is reported there, with its exit code), then forks the mount
process, which mounts, writes its record and says "ready" over a pipe; only then does
`start` return, like wimmount.  What is served comes from a `MountPlan`: a read-only index
(`read_only`, here) or a writable session (imagefs.session.mounts).

Unmounting is a plain umount(2) (fusermount3 -u when not root): when processes still use
the mount it is refused and they are named, as `fuser -m` would.  The mount process then
sees its session end, closes and exits; SIGTERM, SIGINT and SIGHUP make it unmount itself
(lazily, so nothing is left mounted even if busy), and a guardian it forks detaches the mount
if it dies any other way (fuse.start_guardian).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from imagefs.errors import (
    AlreadyMounted,
    BadMountPoint,
    Error,
    MountFailed,
    MountPointBusy,
    SystemFailure,
    UsageError,
)
from imagefs.format.container import now_iso

from .kernel import FSTYPE, canonical, find_mount, holders, is_dead, pid_alive, umount, wait_ended
from .options import pack_cache, parse_options
from .registry import MountRecord, log_path, record_for

if TYPE_CHECKING:
    from imagefs.image import Image

META_CACHE = 24 << 20  # decompressed metadata blocks
# Decoded records, weighed by their extents and entries.  A walk visits each record about
# once and the kernel keeps the attributes and entries it was given, so a small cache
# serves as well as a large one: tar and find -ls of bookworm-web took the same time at
# 8 192 as at 32 768, and the read-only mount's peak RSS fell from 56-58 MB to 48 MB
# (~1 KB per decoded record of its 11 115: tracemalloc).
INODE_CACHE_WEIGHT = 8_192
READY = b"ok\n"  # the mount process's word over the pipe; else "err CODE\tmessage\n"
log = logging.getLogger("imagefs.mount")


@dataclass
class MountPlan:
    """What start() serves, and what it does at each step of the mount's life."""

    rec: MountRecord
    label: str
    make_ops: Callable[[], object]
    ready: Callable[[MountRecord], None] = lambda rec: None
    ended: Callable[[], None] = lambda: None
    failed: Callable[[], None] = lambda: None  # it never became ready
    parent_done: Callable[[], None] = lambda: None
    tied_to: int = 0  # a pid: the mount ends when that process does (fuse.serve)


def _server_gone(path: str) -> bool:
    """The mount at path has no server: it answers ENOTCONN, or the process its record
    names has ended (killed, the kernel may not have aborted the connection yet: a
    process's threads end after it is already a zombie)."""
    if is_dead(path):
        return True
    rec = record_for(path)
    return rec is not None and rec.pid > 0 and not pid_alive(rec.pid)


def check_mountpoint(mountpoint: str) -> str:
    path = canonical(mountpoint)
    existing = find_mount(path)
    if existing is not None and existing.fstype == FSTYPE and _server_gone(path):
        # Its process died; its guardian detaches it, but perhaps not yet: do it now.
        umount(path, lazy=True)
        existing = find_mount(path)
    if existing is not None and existing.fstype == FSTYPE:
        raise AlreadyMounted(path, existing.source)
    if not os.path.isdir(path):
        raise BadMountPoint(path, "not an existing directory")
    return path


def start(open_plan: Callable[[str, int | None], MountPlan], mountpoint: str,
          option_specs: list[str], writable: bool = False, foreground: bool = False,
          announce: Callable[[MountRecord], None] | None = None,
          not_inherited: tuple[int, ...] = (), tied_to: int = 0) -> MountRecord:
    """Mount what open_plan(mountpoint, cache bytes) opens.  In the background (the
    default) this returns once the mount is ready; with foreground it returns after
    unmount.  The mount process closes the descriptors in not_inherited (the caller's,
    not the mount's to hold), and with tied_to ends when that process does."""
    fuse_opts, cache = parse_options(option_specs, writable)
    path = check_mountpoint(mountpoint)
    plan = open_plan(path, cache)
    plan.tied_to = tied_to
    from .fuse import mount_options

    opts = mount_options(plan.rec.image, fuse_opts, writable=plan.rec.mode == "rw")
    rec = plan.rec
    rec.mountpoint = path
    rec.pid = os.getpid()
    rec.started = now_iso()
    rec.log = log_path(path)
    if foreground:
        return _serve_here(plan, path, opts, announce)
    return _serve_in_child(plan, path, opts, not_inherited)


def _announce_ready(plan: MountPlan) -> None:
    rec = plan.rec
    rec.save()
    plan.ready(rec)
    how = f"writable (session {rec.session})" if rec.session else "read-only"
    log.info("%s mounted %s at %s", plan.label, how, rec.mountpoint)


def _serve_here(plan: MountPlan, path: str, opts: set[str],
                announce: Callable[[MountRecord], None] | None) -> MountRecord:
    """--foreground: this process serves the mount until it is unmounted."""
    _log_to(sys.stderr)

    def ready_fg() -> None:
        plan.rec.log = ""
        _announce_ready(plan)
        if announce:
            announce(plan.rec)

    try:
        _serve_or_fail(plan, path, opts, ready_fg, None)
    except BaseException:
        plan.failed()
        raise
    finally:
        plan.rec.remove()
        plan.ended()
    return plan.rec


def _serve_in_child(plan: MountPlan, path: str, opts: set[str],
                    not_inherited: tuple[int, ...]) -> MountRecord:
    """Fork the mount process and wait for its word: ready, or why not."""
    rec = plan.rec
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
                _announce_ready(plan)
                os.write(w, READY)
                os.close(w)

            _serve_or_fail(plan, path, opts, ready_bg, w)
        except BaseException:
            code = 1
        finally:
            rec.remove()
            plan.ended()
            logging.shutdown()
            os._exit(code)
    os.close(w)
    reply = b""
    while chunk := os.read(r, 4096):
        reply += chunk
    os.close(r)
    plan.parent_done()
    if reply.startswith(READY):
        rec.pid = pid
        return rec
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    plan.failed()
    if reply.startswith(b"err "):
        code_s, _, message = reply[4:].decode("utf-8", "replace").partition("\t")
        if code_s == str(UsageError.exit_code):
            raise UsageError(f"{path}: {message.strip()}")
        raise MountFailed(path, message.strip())
    raise MountFailed(path, f"the mount process died before it was ready; see {rec.log}")


def read_only(image_path: str, index_spec: str, cache: int | None,
              opened: Image | None = None) -> MountPlan:
    """The plan of a read-only mount of one index (of opened, an image already open, when
    given: an index of a store, whose path is its URL)."""
    from imagefs.format.packs import PackReader
    from imagefs.format.records import MetaReader
    from imagefs.format.view import IndexView
    from imagefs.image import Image

    from .fuse import ReadOnlyOperations
    from .tree import IndexTree

    img = opened or Image.open(image_path)
    number, entry = img.select(index_spec)
    # The kernel caches what it was given (entries, attributes, pages), so the driver's own
    # metadata caches can stay small: 500 000 files are walked in well under 150 MB.
    view = IndexView(img.file, number, entry, meta=MetaReader(img.file, META_CACHE),
                     packs=PackReader(img.file,
                                      cache_bytes=pack_cache(cache, img.file.header)))
    tree = IndexTree(view, inode_cache_weight=INODE_CACHE_WEIGHT)
    image_abs = img.path if opened else os.path.abspath(image_path)
    label = f"image {image_abs} index {number} ({entry.name})"
    ops = ReadOnlyOperations(tree, label)
    rec = MountRecord(image=image_abs, index=number, name=entry.name, mountpoint="", pid=0)
    return MountPlan(rec, label, lambda: ops, parent_done=img.close)


def _serve_or_fail(plan: MountPlan, path: str, opts: set[str],
                   ready: Callable[[], None], fail_fd: int | None) -> None:
    from .fuse import serve

    ready_called = False

    def ready_once() -> None:
        nonlocal ready_called
        ready_called = True
        ready()

    try:
        serve(plan.make_ops(), path, opts, ready_once,  # type: ignore[arg-type]
              tied_to=plan.tied_to)
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


def _become_daemon(log_file: str) -> None:
    """Detach from the terminal and the caller's session; stdio → /dev/null and the log."""
    os.setsid()
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(fd, 2)
    os.close(null)
    os.close(fd)
    os.chdir("/")
    sys.stderr = os.fdopen(2, "w", buffering=1)
    _log_to(sys.stderr)


def detach(path: str, rec: MountRecord, wait: float, done: str = "") -> None:
    """Unmount the mount at path (canonical) and wait up to `wait` seconds for its process
    to end; refuse, naming the holders, while it is in use.  done prefixes the refusal
    with what already happened (e.g. the changes were committed)."""
    err = umount(path)
    if err == errno.EBUSY:
        who = holders(path)
        if who:
            named = "; ".join(f"pid {p} ({c}: {h})" for p, c, h in who)
            raise MountPointBusy(path, f"{done}in use by {named}")
        raise MountPointBusy(path, f"{done}in use (by a process in another namespace, or a "
                                   "mount inside it)")
    if err:
        raise SystemFailure(path, f"umount failed: {os.strerror(err)}")
    wait_ended(rec.pid, wait)
    rec.remove()
