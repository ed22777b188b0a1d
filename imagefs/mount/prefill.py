"""Filling the kernel's page cache before readers ask (read-only mounts).

A walk that reads every file (tar, rsync, cp -a, a checksum run) costs one READ round trip
per small file, and on two CPUs each round trip is two cross-CPU wakeups: for bookworm-web,
11 087 READs made most of the gap to the kernel's own squashfs.  Yet the content of a
small file usually sits in a pack the driver has just decompressed for its neighbour.

So whenever a pack comes into the cache (decompressed for a read, or read ahead), every
regular file the kernel already knows (named in a directory listing or a lookup the driver
answered) whose content lies wholly in cached packs is written into the kernel's page cache
with FUSE_NOTIFY_STORE (pyfuse3.notify_store).  Its reader then finds the pages there and
asks nothing: tar of bookworm-web sends 615-925 READs instead of 11 087.

The rules that keep this safe and cheap:
- Only for an immutable index: a writable mount's file could change between the read here
  and the store, leaving stale pages.
- Only files the kernel knows: a store for an inode it does not hold fails (ENOENT) and is
  dropped.  A file named in a reply is handed on only at the next request (flush()), when
  that reply has certainly reached the kernel.
- Never decompresses for a guess: only packs already cached are used, so reading one small
  file still decompresses one pack (a wrong guess costs a copy into the page cache).
- Stores run on a thread of their own: the kernel locks each page it fills, and a reader
  may hold that page locked while its READ waits for the loop thread, so the loop thread
  must never be the one storing.
- Bounded: files up to MAX_FILE bytes; at most MAX_WAITING files wait for their pack
  (beyond that the oldest wishes are dropped: they are an optimisation, not a promise).
- Damage is never stored: the content goes through IndexView.read, which checks every
  chunk's xxh3; a file that fails is skipped here, and its reader meets and reports the
  error as before.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from imagefs.errors import CorruptImage
from imagefs.format import layout as F

from .tree import IndexTree

log = logging.getLogger("imagefs.mount")

MAX_FILE = 1 << 20  # = READ_AHEAD_KB: larger files come in 1 MiB requests anyway, and
# their copies (a file over several packs is joined to be stored) raised the peak RSS of
# a tar of bookworm-web by 3 MB
MAX_WAITING = 1 << 16  # files waiting for their pack to be decompressed
STOP_WAIT = 5.0  # seconds stop() waits for a store in progress


class PageFiller:
    """Stores known files' content into the page cache as their packs are decompressed.

    note() and flush() are called by the loop thread; pack_cached() by whichever thread
    decompressed a pack; the stores by a thread of this object's own (start())."""

    def __init__(self, tree: IndexTree,
                 store: Callable[[int, int, bytes | memoryview], int]) -> None:
        self.tree = tree
        self.packs = tree.view.packs
        self._store = store  # fuse.store_in_page_cache(ino, offset, data) -> 0 or -errno
        self._lock = threading.Lock()
        # a pack not yet cached -> the files waiting for it (the earliest wish first)
        self._waiting: OrderedDict[int, list[int]] = OrderedDict()
        self._n_waiting = 0
        self._pending: list[int] = []  # named in the last reply; sent at the next request
        self._queue: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.stored = 0  # files stored (for the mount's last log line)

    def start(self) -> None:
        """Start the storing thread (in the mount process, after any fork)."""
        self.packs.on_cached = self.pack_cached
        self._thread = threading.Thread(target=self._run, name="page-filler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop storing; called before the FUSE session is destroyed."""
        self.packs.on_cached = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(STOP_WAIT)
            if self._thread.is_alive():
                log.warning("the page filler did not stop within %.0f s", STOP_WAIT)

    # --- the loop thread -----------------------------------------------------------------

    def note(self, ino: int, node: Any) -> None:
        """The kernel is being told of inode ino (a listing or lookup reply): store its
        content once all of it is cached."""
        if node.kind != F.REG or not node.extents or node.size > MAX_FILE:
            return
        missing = self._missing(node)
        if missing is None:
            self._pending.append(ino)
        else:
            self._wait(missing, ino)

    def _missing(self, node: Any) -> int | None:
        """A pack of the file's content that is not cached, or None."""
        for ext in node.extents:
            if not self.packs.is_cached(ext[1]):
                return int(ext[1])
        return None

    def _wait(self, pack: int, ino: int) -> None:
        with self._lock:
            wanted = self._waiting.get(pack)
            if wanted is None:
                wanted = self._waiting[pack] = []
            wanted.append(ino)
            self._n_waiting += 1
            while self._n_waiting > MAX_WAITING:
                _pack, dropped = self._waiting.popitem(last=False)
                self._n_waiting -= len(dropped)

    def flush(self) -> None:
        """A new request arrived, so the previous reply reached the kernel: hand the files
        it named over to the storing thread."""
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    # --- any thread ----------------------------------------------------------------------

    def pack_cached(self, pack: int) -> None:
        """PackReader's on_cached: the files waiting for this pack can be stored now."""
        with self._lock:
            wanted = self._waiting.pop(pack, None)
            if wanted:
                self._n_waiting -= len(wanted)
        if wanted:
            self._queue.put(wanted)

    # --- the storing thread --------------------------------------------------------------

    def _run(self) -> None:
        while (inos := self._queue.get()) is not None:
            for ino in inos:
                try:
                    self._fill(ino)
                except CorruptImage:
                    pass  # its reader meets the damage and reports it
                except Exception:  # noqa: BLE001 - never the end of the mount
                    log.exception("page filler: inode %d", ino)

    def _fill(self, ino: int) -> None:
        node = self.tree.inode(ino)
        missing = self._missing(node)
        if missing is not None:  # a file over several packs, or one evicted meanwhile
            self._wait(missing, ino)
            return
        if self._store(ino, 0, self.tree.view.read(node, 0, node.size)) == 0:
            self.stored += 1
