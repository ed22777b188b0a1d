"""The FUSE side of a mount: what read-only and writable mounts share (BaseOperations:
the error boundary, attributes, fast paths, the serving loop), and the read-only
adapter over tree.IndexTree.  The writable one is imagefs/session/fuse.py.

Requests that never wait (lookup, getattr, xattrs, readlink, read, write, flush, release,
forget, and a writable mount's changes) are answered by plain functions called from
_fuseshim, which then drains the requests already waiting without going back to the loop
(trio_loop.py's, or plain_loop.py's for a servicing transaction's mount); the rest go
through pyfuse3's coroutines.  The fast paths are off (pyfuse3's
coroutines answer everything) with IMAGEFS_NO_FAST_PATHS=1, without the shim, and with
pyfuse3 or libfuse versions the shim does not know (shim.py, docs/shim.md); the mount's log
then says so once.

Every handler passes through one boundary: an answer the filesystem gives on purpose
(ENOENT, ENOTDIR, ENXIO...) goes back as its errno; damage in the image becomes EIO and one
log line naming the image, index, path and chunk; anything unexpected becomes EIO and a
logged traceback.  Nothing escapes into pyfuse3's loop, where it would end the mount.

The kernel is asked to cache everything (the index never changes under a mount): long
entry and attribute timeouts, negative lookups cached (st_ino 0), keep_cache on open files,
symlinks cached, 1 MiB readahead, and (through _fuseshim) no open or opendir requests at
all.  Packs missing from the cache are decompressed inline, once each: the loop is one
thread, so no pack is ever decompressed twice at once.  Each decompressed pack also fills
the page cache with the other files in it that the kernel knows (prefill.py), so a walk
that reads every file asks for few of them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

# The shim must be loaded, with its symbols global, before pyfuse3 binds fuse_session_new:
# shim.py does that, then imports pyfuse3.
from . import shim

# None when the shim is not built (mounts work, lseek reports no holes) or out of date.
_fuseshim = shim.shim()

import pyfuse3  # noqa: E402

from imagefs.errors import CorruptImage  # noqa: E402
from imagefs.format import layout as F  # noqa: E402
from imagefs.format.packs import PackReader  # noqa: E402

from . import plain_loop  # noqa: E402
from .cpu import pin_here  # noqa: E402
from .prefill import PageFiller  # noqa: E402
from .tree import IndexTree, Refusal  # noqa: E402

if TYPE_CHECKING:
    import trio

log = logging.getLogger("imagefs.mount")

TIMEOUT = 30 * 86400.0  # seconds the kernel may trust an entry or attribute: forever here
READ_AHEAD_KB = 1024
INIT_TIMEOUT = 10
DIRENTPLUS_MIN = 160  # bytes of one READDIRPLUS entry: fuse_entry_out, fuse_dirent, a name
# Mounts wait this long in the shim for a reader's next request before going back to the
# trio loop (a third less driver CPU for `tar` of a whole tree), polling all the while
# instead of sleeping: a sleeping driver must be woken, which under a hypervisor costs more
# than the request.  Interleaved runs on this 2-CPU VM, sleeping → polling: find -ls of
# bookworm-web, fresh, median 0.79 → 0.50 s; fio 4 KiB randrw on a writable mount 10 096 →
# 25 680 read IOPS; scripts/smallfiles 1 653 → 2 606 creates/s.
DRAIN_WAIT_US = 1000
DRAIN_SPIN_US = 1000
NO_FILL = "IMAGEFS_NO_PREFILL"  # set: read-only mounts do not fill the page cache ahead

T = TypeVar("T")
P = ParamSpec("P")


def boundary(handler: Callable[P, Coroutine[Any, Any, T]]
             ) -> Callable[P, Coroutine[Any, Any, T]]:
    """Map whatever a handler raises to an errno; log what is not an answer."""

    @functools.wraps(handler)
    async def wrapped(*all_args: P.args, **kwargs: P.kwargs) -> T:
        self: ReadOnlyOperations = all_args[0]  # type: ignore[assignment]
        args = all_args[1:]
        try:
            return await handler(*all_args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(self.errno_for(e, handler.__name__, args)) from None

    return wrapped


class BaseOperations(pyfuse3.Operations):
    """What both kinds of mount share: the error boundary, INIT, attributes, lseek."""

    packs: PackReader
    tree: Any  # the inode layer: tree.IndexTree, or imagefs.session.tree.SessionTree
    # see _fuseshim's drain(): how long to wait there for the next request, and how much of
    # that wait is spent polling without sleeping
    drain_wait_us = DRAIN_WAIT_US
    drain_spin_us = DRAIN_SPIN_US
    # a servicing transaction's mount: on one CPU with the programs it serves (cpu.py), so
    # it never polls for their next request, which would keep them from running
    shares_cpu = False
    # nothing of it ever waits inside a request or runs beside the requests (no commits
    # through a control socket, no periodic writes): served by plain_loop, without trio
    plain_loop = False

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.nursery: trio.Nursery | None = None  # the trio loop's (trio_loop.py)
        self.initialized = False
        self.on_init: Callable[[], None] = lambda: None
        self._reported: set[tuple[int, str]] = set()
        fault = os.environ.get("IMAGEFS_TEST_FAULT")
        self._fault = os.fsencode(fault) if fault else None

    def init(self) -> None:
        """Called by pyfuse3 inside the kernel's INIT request, before it is answered."""
        self.initialized = True
        self.on_init()

    def shim_handlers(self) -> tuple[Any, ...]:
        """_fuseshim.configure's arguments."""
        return (self.lseek, True, shim.FREE_OPENS_ALL, None, None, False,
                self.fast_handlers())

    # --- fast paths (through _fuseshim: synchronous, in the loop's thread) ---------------
    #
    # Requests that never wait are answered by plain functions called from C, without
    # pyfuse3's per-request coroutine: a third of the driver's time per request.  Each
    # returns its answer or a negative errno, through the same errno boundary.

    def fast_handlers(self) -> dict[str, Callable[..., Any]] | None:
        """The fast handlers for _fuseshim.configure, or None: the fast paths are off
        (IMAGEFS_NO_FAST_PATHS, or versions the shim does not know: shim.fast_paths_off)."""
        if shim.fast_paths_off():
            return None
        return {name: self._fast(name, fn) for name, fn in self.fast_functions().items()}

    def fast_functions(self) -> dict[str, Callable[..., Any]]:
        return {}

    def _fast(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except pyfuse3.FUSEError as e:
                return -e.errno
            except Exception as e:
                return -self.errno_for(e, name, args)

        return call

    def attr_tuple(self, ino: int, node: Any) -> tuple[Any, ...]:
        """What the fast paths answer for an inode (the fields of attributes())."""
        return (ino, node.mode, node.nlink, node.uid, node.gid, node.rdev,
                self.size_of(node), self.blocks_of(node), node.atime_ns, node.mtime_ns,
                node.ctime_ns, TIMEOUT)

    NEGATIVE = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, TIMEOUT)  # st_ino 0: absence cached

    def xattr_or_missing(self, value: bytes | None) -> bytes | int:
        return -pyfuse3.ENOATTR if value is None else value

    async def background(self, nursery: trio.Nursery) -> None:
        """Start tasks that live as long as the mount (the trio loop's; the plain loop
        starts none)."""

    def stopping(self) -> None:
        """The loop has ended and the FUSE session is about to be destroyed: stop threads
        that talk to it."""

    def finished(self) -> None:
        """The mount is gone: last words (flush state, close files)."""

    def filled(self) -> str:
        """What the mount's last log line adds after its decompressions."""
        return ""

    # --- attributes --------------------------------------------------------------------

    def size_of(self, node: Any) -> int:
        return int(self.tree.size(node))

    def blocks_of(self, node: Any) -> int:
        return int(self.tree.blocks(node))

    def seek(self, inode: int, offset: int, whence: int) -> int:
        return int(self.tree.seek(inode, offset, whence))

    def path_of(self, inode: int) -> bytes | None:
        raise NotImplementedError

    def attributes(self, ino: int, node: Any) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = self.size_of(node)
        a.st_blksize = 4096
        a.st_blocks = self.blocks_of(node)
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def negative_entry(self) -> pyfuse3.EntryAttributes:
        miss = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
        miss.st_ino = 0
        miss.entry_timeout = TIMEOUT
        return miss

    def check_fault(self, name: bytes) -> None:
        if self._fault is not None and name == self._fault:
            raise RuntimeError("injected fault (IMAGEFS_TEST_FAULT)")

    # --- lseek (through _fuseshim; synchronous, in the loop's thread) -------------------

    def lseek(self, inode: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE: the offset, or -errno."""
        try:
            return self.seek(inode, offset, whence)
        except Exception as e:
            return -self.errno_for(e, "lseek", (inode, offset))

    # --- the boundary --------------------------------------------------------------------

    def errno_for(self, exc: Exception, handler: str, args: tuple[Any, ...]) -> int:
        """The errno a request gets for what its handler raised; all but refusals logged."""
        if isinstance(exc, Refusal):
            return exc.errno or errno.EIO
        if isinstance(exc, CorruptImage):
            self.report_damage(int(args[0]) if args else 0, exc)
            return errno.EIO
        if isinstance(exc, OSError):  # the image file or the staging failed
            log.error("%s: %s failed: %s", self.label, handler, exc)
            return exc.errno or errno.EIO
        if isinstance(exc, sqlite3.Error):
            log.error("%s: %s: staging database: %s", self.label, handler, exc)
            return errno.ENOSPC if "full" in str(exc) else errno.EIO
        log.error("%s: unexpected error in %s%r; answered EIO", self.label, handler,
                  args[:2], exc_info=exc)
        return errno.EIO

    def report_damage(self, inode: int, exc: CorruptImage) -> None:
        """One log line per damaged inode and cause, with the inode's path found in the
        background (a walk of the tree must not hold up other requests)."""
        key = (inode, str(exc))
        if key in self._reported:
            return
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported.add(key)
        threading.Thread(target=self._log_damage, args=(inode, exc), daemon=True,
                         name="damage-report").start()

    def _log_damage(self, inode: int, exc: CorruptImage) -> None:
        path = self.path_of(inode)
        shown = path.decode("utf-8", "backslashreplace") if path else f"<inode {inode}>"
        log.error("%s path %s: I/O error (EIO): %s", self.label, shown, exc)


class ReadOnlyOperations(BaseOperations):
    """Requests → IndexTree calls.  File and directory handles are inode numbers: an
    immutable index needs no per-open state."""

    def __init__(self, tree: IndexTree, label: str) -> None:
        super().__init__(label)
        self.tree = tree
        self.packs = tree.view.packs
        self.filler: PageFiller | None = None
        if not shim.fast_paths_off() and not os.environ.get(NO_FILL):
            self.filler = PageFiller(tree, store_in_page_cache)

    async def background(self, nursery: trio.Nursery) -> None:
        if self.filler is not None:
            self.filler.start()

    def stopping(self) -> None:
        if self.filler is not None:
            self.filler.stop()

    def filled(self) -> str:
        if self.filler is None:
            return ""
        return f"; {self.filler.stored} files put in the page cache ahead"

    def path_of(self, inode: int) -> bytes | None:
        return self.tree.path_of(inode)

    def fast_functions(self) -> dict[str, Callable[..., Any]]:
        tree = self.tree

        filler = self.filler
        flush = filler.flush if filler is not None else lambda: None
        note = filler.note if filler is not None else lambda ino, node: None

        def lookup(parent: int, name: bytes) -> tuple[Any, ...]:
            flush()
            self.check_fault(name)
            hit = tree.lookup(parent, name)
            if hit is None:
                return self.NEGATIVE
            note(*hit)
            return self.attr_tuple(*hit)

        def readdir(fh: int, start_id: int, size: int) -> list[tuple[Any, ...]]:
            # As readdir below, for the shim: enough entries to fill size bytes (each
            # takes at least DIRENTPLUS_MIN); the shim sends those that fit.
            flush()
            out = []
            for name, ino, node, next_id in tree.entries(fh, start_id):
                note(ino, node)
                out.append((name, self.attr_tuple(ino, node), next_id))
                if len(out) * DIRENTPLUS_MIN >= size:
                    break
            return out

        def read(fh: int, off: int, size: int) -> bytes | memoryview:
            flush()
            return tree.view.read(tree.inode(fh), off, size)

        return {
            "lookup": lookup,
            "getattr": lambda ino: self.attr_tuple(ino, tree.inode(ino)),
            "readlink": tree.readlink,
            "getxattr": lambda ino, name: self.xattr_or_missing(tree.xattr(ino, name)),
            "listxattr": lambda ino: b"".join(n + b"\0" for n in tree.xattr_names(ino)),
            "read": read,
            "readdir": readdir,
        }

    @boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        self.check_fault(name)
        hit = self.tree.lookup(parent_inode, name)
        if hit is None:
            return self.negative_entry()
        return self.attributes(*hit)

    @boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attributes(inode, self.tree.inode(inode))

    @boundary
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.tree.readlink(inode)

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        value = self.tree.xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @boundary
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return self.tree.xattr_names(inode)

    @boundary
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        usage = self.tree.usage()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = usage.block_size
        s.f_blocks = usage.blocks
        s.f_bfree = s.f_bavail = 0
        s.f_files = usage.files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = usage.name_max
        return s

    # --- directories -------------------------------------------------------------------

    @boundary
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if self.tree.inode(inode).kind != F.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # Every entry readdir_reply accepts counts as a lookup; numbers are record
        # addresses, valid for as long as the mount, so forget has nothing to release.
        for name, ino, node, next_id in self.tree.entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.attributes(ino, node), next_id):
                break

    # --- files -------------------------------------------------------------------------

    @boundary
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.tree.inode(inode).kind == F.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # Packs (<= ~1.25 MiB raw) are decompressed inline: ~0.3 ms each, where a hop to a
        # worker thread and back costs ~2 ms of latency on this loop (measured).
        return self.tree.view.read(self.tree.inode(fh), off, size)


def store_in_page_cache(ino: int, offset: int, data: bytes | memoryview) -> int:
    """pyfuse3.notify_store (FUSE_NOTIFY_STORE, the GIL released while the kernel copies):
    0, or -errno (ENOENT: the kernel does not know ino; EINVAL: not a regular file)."""
    try:
        # any buffer will do (it takes a Py_buffer), though its stub says bytes
        pyfuse3.notify_store(ino, offset, data)  # type: ignore[arg-type]
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def mount_options(image_path: str, extra: list[str], writable: bool = False) -> set[str]:
    """The FUSE options of a mount.  Root mounts serve every user with the kernel checking
    permissions, and keep setuid binaries and device nodes working so a chroot or a
    container booted from the mount behaves like the real system."""
    fsname = image_path.replace("\\", "\\\\").replace(",", "\\,")
    opts = {"default_permissions", f"fsname={fsname}", "subtype=imagefs"}
    if not writable:
        opts.add("ro")
    if os.geteuid() == 0:
        opts |= {"allow_other", "suid", "dev"}
    for opt in extra:  # the admin's choice wins over a default it contradicts
        opts.discard(opt[2:] if opt.startswith("no") else "no" + opt)
        opts.add(opt)
    return opts


def serve(ops: BaseOperations, mountpoint: str, options: set[str],
          ready: Callable[[], None] | None = None, tied_to: int = 0) -> None:
    """Mount, serve until unmounted or signalled, then unmount.  ready() is called once the
    kernel's INIT is answered and readahead is raised: from then on the mount behaves as it
    always will (a file opened before the readahead change would keep 128 KiB).  With
    tied_to, the mount also ends when that process does (a servicing verb's mounts must not
    outlive it, also when it is killed)."""
    if ops.shares_cpu:
        pin_here()
    if _fuseshim is not None:
        _fuseshim.configure(*ops.shim_handlers())
        _fuseshim.set_drain_wait(ops.drain_wait_us, 0 if ops.shares_cpu else ops.drain_spin_us)
    shim.say_once(ops.label)  # the one line saying the fast paths are off, and why
    pyfuse3.init(ops, mountpoint, options)
    try:
        if _fuseshim is not None and not _fuseshim.active():
            log.warning("%s: the C shim is not beneath pyfuse3 (its fuse_session_new() was "
                        "not called): no fast paths, SEEK_HOLE will not report holes",
                        ops.label)
        start_guardian(mountpoint)

        def announce() -> None:
            # The kernel lowers readahead to what INIT negotiated when the reply arrives,
            # so the larger value is written after it, and only then is the mount
            # announced.
            set_read_ahead(mountpoint)
            if ready is not None:
                ready()

        if ops.plain_loop:
            plain_loop.run(pyfuse3, lambda: ops.initialized, announce, tied_to, INIT_TIMEOUT)
        else:
            from . import trio_loop

            trio_loop.run(ops, announce, tied_to, INIT_TIMEOUT)
    finally:
        ops.stopping()
        pyfuse3.close(unmount=True)
        ops.finished()
        log.info("%s: unmounted from %s (%d pack decompressions)%s; requests %s", ops.label,
                 mountpoint, ops.packs.decompressions, ops.filled(), shim.request_summary())


def start_guardian(mountpoint: str) -> None:
    """Fork a small process that outlives this one only to detach the mount if this
    process dies without unmounting (SIGKILL, a crash): it waits for the end of a pipe whose
    other end only this process holds.  (libfuse's auto_unmount would do the same through
    fusermount3, but forces nosuid,nodev, which a root mount of an OS image must not have.)
    """
    from .kernel import find_mount, umount

    m = find_mount(mountpoint)
    if m is None:
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(r)  # w stays open, unused, until this process ends
        return
    try:
        from setproctitle import setproctitle

        setproctitle(f"imagefs mount guardian {mountpoint}")
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(3, r)  # above all the /dev/fuse fd: the connection must not outlive
        os.closerange(r + 1, 1 << 16)  # the server because this process holds it
        os.read(r, 1)
        now = find_mount(mountpoint)
        if now is not None and now.device == m.device:
            umount(mountpoint, lazy=True)
    finally:
        os._exit(0)


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> None:
    """1 MiB readahead: sequential reads then come as 1 MiB requests, not 128 KiB."""
    from .kernel import find_mount

    m = find_mount(mountpoint)
    if m is None:
        return
    with contextlib.suppress(OSError), open(f"/sys/class/bdi/{m.device}/read_ahead_kb",
                                            "w") as fh:
        fh.write(str(kb))
