"""A bundle's imagefs file, its packs read from the store: the source of a pull.

The file holds an index's records, chunk table and commit; its pack ids are the ids the
index had where it was pushed from, and the bundle's pack list says which object each
stands for.  Every pack read (PackReader, PackCopier: kind KIND_PACK) fetches that object,
checks it against its name (SHA-256) and its size, and checks its frame header as the image
file's own frames are checked; all other frames are the local file's.
"""

from __future__ import annotations

from imagefs.errors import StoreCorrupt
from imagefs.format import layout as F
from imagefs.format.container import FrameInfo, ImageFile

from .cache import StoreCache
from .client import Store
from .layout import PACKS, PackObject, digest_of


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
        return self

    def pack_object(self, pack: int) -> bytes:
        """The checked bytes of the object pack id pack stands for."""
        obj = self.packs.get(pack)
        if obj is None:
            raise StoreCorrupt(str(self.store.url), f"the index names pack {pack}, which its "
                                                    "bundle does not list")
        data = self.cache.get(obj.sha256) if self.cache is not None else None
        if data is not None and len(data) == obj.size and digest_of(data) == obj.sha256:
            return data
        data = self.store.get(self.store.url.key(PACKS, obj.sha256), obj.size)
        self.fetched += 1
        if len(data) != obj.size or digest_of(data) != obj.sha256:
            raise StoreCorrupt(f"{self.store.url}/{PACKS}/{obj.sha256}",
                               "its content does not match its name")
        if self.cache is not None:
            self.cache.put(obj.sha256, data)
        return data

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
