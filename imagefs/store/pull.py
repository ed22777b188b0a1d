"""imagefs pull: indices of a store into a local image file, fetching only what it lacks.

Each index's ref names its bundle; the bundle is fetched (bounded, checked against its
name) into a private temporary folder and opened as an image whose packs are the store's
(bundle_file.BundleFile).  Then the indices are exported into LOCAL, all in one
transaction (export.export_sources_into): a pack is fetched when a chunk of it is needed
that LOCAL does not hold, copied as it is when LOCAL holds none of its chunks, and each
fetched object is checked against its name before it is used.  A new LOCAL appears whole
or not at all; an existing one gets the indices appended in one commit, so a pull killed
at any moment leaves LOCAL as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagefs.errors import DestinationError, UsageError
from imagefs.export import export_sources_into, write_into
from imagefs.image import Image, is_image_file

from .bundle_file import BundleFile
from .cache import StoreCache
from .client import Store, StoreUrl, parse_url
from .remote import open_index, ref_names
from .scratch import scratch


@dataclass
class Pulled:
    dest: str
    indices: list[int]  # their numbers in dest
    names: list[str]
    bytes_received: int
    packs_fetched: int

    def to_json(self) -> dict[str, Any]:
        return {"dest": self.dest, "indices": self.indices, "names": self.names,
                "bytes_received": self.bytes_received, "packs_fetched": self.packs_fetched}


def pull(url_text: str, selection: str, dest: str, endpoint: str | None = None,
         progress: Callable[[int], None] | None = None,
         on_total: Callable[[int], None] | None = None,
         who: dict[str, Any] | None = None, wait: float | None = None) -> Pulled:
    """Pull the indices selection names ("web", "web,db", "all") into dest."""
    url = parse_url(url_text)
    store = Store(url, endpoint)
    names = _selected(store, url, selection)
    if os.path.exists(dest) and not is_image_file(dest):  # before any bundle is fetched
        raise DestinationError(dest, "exists and is not an imagefs image")
    with scratch("pull") as folder:
        images: list[Image] = []
        bundles = StoreCache(folder)  # the bundles only: a pull's packs go to LOCAL
        try:
            for name in names:
                images.append(open_index(store, name, bundles, packs=None))
            if on_total:
                on_total(sum(i.indices[0].bytes for i in images))
            sources = [(i, [1], i.path) for i in images]
            numbers = _into(dest, sources, progress, who, wait)
        finally:
            for image in images:
                image.close()
        fetched = sum(i.file.fetched for i in images if isinstance(i.file, BundleFile))
    return Pulled(dest, numbers, names, store.received, fetched)


def _selected(store: Store, url: StoreUrl, selection: str) -> list[str]:
    have = ref_names(store)
    if selection == "all":
        if not have:
            raise UsageError(f"{url}: the store holds no index")
        return have
    names = [n for n in selection.split(",") if n]
    missing = [n for n in names if n not in have]
    if missing or not names:
        raise UsageError(f"{url}: no index named {', '.join(map(repr, missing or [selection]))}"
                         f" (the store holds: {', '.join(have) or 'none'})")
    return list(dict.fromkeys(names))


def _into(dest: str, sources: list[tuple[Image, list[int], str]],
          progress: Callable[[int], None] | None, who: dict[str, Any] | None,
          wait: float | None) -> list[int]:
    return write_into(dest, lambda out, wait: export_sources_into(
        sources, out, None, progress, who, wait, "pull"), wait, doing="pulling")
