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
from dataclasses import dataclass

from imagefs.errors import StoreCorrupt
from imagefs.format import layout as F
from imagefs.format.container import FrameInfo, ImageFile

from .cache import StoreCache
from .client import Store
from .layout import PACKS, PackObject, digest_of

AHEAD = 4  # packs fetched ahead of a reader (~4 MiB in memory at 1 MiB a pack)
# Packs fetched ahead and not yet read, kept at most (~16 MiB): a reader often goes through
# two runs of packs at once (an index's own packs, appended after those it shares with the
# index pushed before it), so the fetches for one run must outlive a visit to the other.
KEPT_AHEAD = 4 * AHEAD


@dataclass
class _Fetched:
    """A pack object, checked; with its frame decompressed when fetched ahead for a reader
    that decompresses (decoded), else None."""

    data: bytes
    decoded: tuple[FrameInfo, bytes] | None = None


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
        self._ahead: dict[int, Future[_Fetched]] = {}
        self._ahead_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        # Whether the last pack read was decompressed (apply, cat, a mount) rather than
        # copied as it is (pull): packs fetched ahead are then decompressed on the
        # fetching threads too, and the reader's thread only uses them.
        self._reader_decodes = False
        return self

    def pack_object(self, pack: int) -> bytes:
        """The checked bytes of the object pack id pack stands for."""
        return self._take(pack).data

    def _take(self, pack: int) -> _Fetched:
        """Pack's object: fetched ahead, cached, or fetched now.  A pack fetched from the
        store has the next AHEAD packs (in file order) fetched meanwhile, on threads: a
        reader going through the index in order (apply, pull, tar of a mount) then finds
        most of them arrived."""
        obj = self.packs.get(pack)
        if obj is None:
            raise StoreCorrupt(str(self.store.url), f"the index names pack {pack}, which its "
                                                    "bundle does not list")
        with self._ahead_lock:
            coming = self._ahead.pop(pack, None)
        if coming is not None:  # fetched ahead (and checked there): not read back
            got = coming.result()
        else:
            data = self.cache.get(obj.sha256) if self.cache is not None else None
            if data is None or len(data) != obj.size or digest_of(data) != obj.sha256:
                data = self._fetch(obj)
            got = _Fetched(data)
        self._fetch_ahead(pack)
        return got

    def _fetch(self, obj: PackObject) -> bytes:
        """Fetch, check and cache one pack object: on a fetching thread for the packs
        ahead, so that the reader's thread only decompresses (an apply of web from a
        store spent 0.3 s of it hashing)."""
        data = self.store.get(self.store.url.key(PACKS, obj.sha256), obj.size)
        with self._ahead_lock:
            self.fetched += 1
        if len(data) != obj.size or digest_of(data) != obj.sha256:
            raise StoreCorrupt(f"{self.store.url}/{PACKS}/{obj.sha256}",
                               "its content does not match its name")
        if self.cache is not None:
            self.cache.put(obj.sha256, data)
        return data

    def _fetch_ahead_one(self, pack: int, obj: PackObject, decode: bool) -> _Fetched:
        data = self._fetch(obj)
        if not decode:
            return _Fetched(data)
        info, payload = self._frame_of(pack, data)
        return _Fetched(data, (info, self.decode_payload(info, payload)))

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
                self._ahead[nxt] = self._pool.submit(self._fetch_ahead_one, nxt, obj,
                                                     self._reader_decodes)
            while len(self._ahead) > KEPT_AHEAD:  # a reader that went elsewhere
                self._ahead.pop(next(iter(self._ahead)))

    def _frame_of(self, pack: int, data: bytes) -> tuple[FrameInfo, bytes]:
        """The frame header and payload of pack's object, checked to be one pack frame."""
        info = self.parse_frame_header(data[:F.FRAME_HEADER], pack, pack + len(data),
                                       F.KIND_PACK)
        if info.stored != len(data) - F.FRAME_HEADER:
            raise StoreCorrupt(f"{self.store.url}/{PACKS}/{self.packs[pack].sha256}",
                               "holds more than one frame")
        return info, data[F.FRAME_HEADER:]

    def frame_info(self, offset: int, kind: bytes | None = None) -> FrameInfo:
        if kind == F.KIND_PACK:
            return self._frame_of(offset, self.pack_object(offset))[0]
        return super().frame_info(offset, kind)

    def read_frame_info(self, offset: int, kind: bytes | None = None
                        ) -> tuple[FrameInfo, bytes]:
        if kind == F.KIND_PACK:
            self._reader_decodes = True
            got = self._take(offset)
            if got.decoded is not None:
                return got.decoded
            info, payload = self._frame_of(offset, got.data)
            return info, self.decode_payload(info, payload)
        return super().read_frame_info(offset, kind)

    def read_stored(self, offset: int, kind: bytes) -> tuple[FrameInfo, bytes]:
        if kind == F.KIND_PACK:
            self._reader_decodes = False
            info, payload = self._frame_of(offset, self.pack_object(offset))
            self._check_stored(info, payload)
            return info, payload
        return super().read_stored(offset, kind)
