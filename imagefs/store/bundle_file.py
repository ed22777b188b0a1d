"""A bundle's imagefs file, its packs read from the store: the source of a pull.

The file holds an index's records, chunk table and commit; its pack ids are the ids the
index had where it was pushed from, and the bundle's pack list says which object each
stands for.  Every pack read (PackReader, PackCopier: kind KIND_PACK) fetches that object,
checks it against its name (SHA-256) and its size, and checks its frame header as the image
file's own frames are checked; all other frames are the local file's.
"""

from __future__ import annotations

import bisect
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from imagefs.errors import StoreCorrupt
from imagefs.format import layout as F
from imagefs.format.container import FrameInfo, ImageFile

from .cache import StoreCache
from .client import Store
from .layout import PACKS, PackObject, digest_of

AHEAD = 4  # packs fetched ahead of a reader (~4 MiB in memory at 1 MiB a pack)


class BundleFile(ImageFile):
    """Open with BundleFile.open(path), then attach(store, packs)."""

    store: Store
    packs: dict[int, PackObject]

    def attach(self, store: Store, packs: dict[int, PackObject],
               cache: StoreCache | None = None) -> BundleFile:
        """Read packs from store (through cache, when given)."""
        self.store = store
        self.packs = packs
        self.cache = cache
        self.fetched = 0  # pack objects fetched from the store
        self._order = sorted(packs)  # pack ids in file order: what a reader reads next
        self._ahead: dict[int, Future[bytes]] = {}
        self._ahead_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        return self

    def pack_object(self, pack: int) -> bytes:
        """The checked bytes of the object pack id pack stands for.  A pack fetched from
        the store has the next AHEAD packs (in file order) fetched meanwhile, on threads: a
        reader going through the index in order (apply, pull, tar of a mount) then finds
        most of them arrived."""
        obj = self.packs.get(pack)
        if obj is None:
            raise StoreCorrupt(str(self.store.url), f"the index names pack {pack}, which its "
                                                    "bundle does not list")
        data = self.cache.get(obj.sha256) if self.cache is not None else None
        if data is not None and len(data) == obj.size and digest_of(data) == obj.sha256:
            return data
        with self._ahead_lock:
            coming = self._ahead.pop(pack, None)
        data = coming.result() if coming is not None else self._fetch(obj)
        self._fetch_ahead(pack)
        if len(data) != obj.size or digest_of(data) != obj.sha256:
            raise StoreCorrupt(f"{self.store.url}/{PACKS}/{obj.sha256}",
                               "its content does not match its name")
        if self.cache is not None:
            self.cache.put(obj.sha256, data)
        return data

    def _fetch(self, obj: PackObject) -> bytes:
        data = self.store.get(self.store.url.key(PACKS, obj.sha256), obj.size)
        self.fetched += 1
        return data

    def _fetch_ahead(self, pack: int) -> None:
        """Start fetching the AHEAD packs after pack that are neither cached nor coming."""
        if self._pool is None or self._pool_pid != os.getpid():  # a forked mount process
            self._pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="imagefs-fetch")
            self._pool_pid = os.getpid()
            self._ahead = {}
        at = bisect.bisect_right(self._order, pack)
        with self._ahead_lock:
            for nxt in self._order[at:at + AHEAD]:
                obj = self.packs[nxt]
                if nxt in self._ahead or (self.cache is not None
                                          and self.cache.has(obj.sha256)):
                    continue
                self._ahead[nxt] = self._pool.submit(self._fetch, obj)
            while len(self._ahead) > 2 * AHEAD:  # a reader that went elsewhere
                self._ahead.pop(next(iter(self._ahead)))

    def _pack_frame(self, pack: int) -> tuple[FrameInfo, bytes]:
        data = self.pack_object(pack)
        info = self.parse_frame_header(data[:F.FRAME_HEADER], pack, pack + len(data),
                                       F.KIND_PACK)
        if info.stored != len(data) - F.FRAME_HEADER:
            raise StoreCorrupt(f"{self.store.url}/{PACKS}/{self.packs[pack].sha256}",
                               "holds more than one frame")
        return info, data[F.FRAME_HEADER:]

    def frame_info(self, offset: int, kind: bytes | None = None) -> FrameInfo:
        if kind == F.KIND_PACK:
            return self._pack_frame(offset)[0]
        return super().frame_info(offset, kind)

    def read_frame_info(self, offset: int, kind: bytes | None = None
                        ) -> tuple[FrameInfo, bytes]:
        if kind == F.KIND_PACK:
            info, payload = self._pack_frame(offset)
            return info, self.decode_payload(info, payload)
        return super().read_frame_info(offset, kind)

    def read_stored(self, offset: int, kind: bytes) -> tuple[FrameInfo, bytes]:
        if kind == F.KIND_PACK:
            info, payload = self._pack_frame(offset)
            self._check_stored(info, payload)
            return info, payload
        return super().read_stored(offset, kind)
