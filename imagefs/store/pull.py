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

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagefs.errors import DestinationError, StoreCorrupt, UsageError
from imagefs.export import export_sources_into, write_into
from imagefs.image import Image, is_image_file

from .bundle_file import BundleFile
from .client import Store, StoreUrl, parse_url
from .layout import (
    BUNDLE_HEAD,
    BUNDLES,
    MAX_REF,
    REFS,
    Ref,
    decode_bundle_head,
    decode_pack_list,
    index_of_ref,
    ref_name,
)


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


def ref_names(store: Store) -> list[str]:
    """The names of the indices the store holds (its refs), sorted."""
    base = store.url.key(REFS) + "/"
    return sorted(index_of_ref(o.key[len(base):]) for o in store.list(REFS)
                  if "/" not in o.key[len(base):])


def read_ref(store: Store, name: str) -> Ref:
    key = store.url.key(REFS, ref_name(name))
    ref = Ref.decode(f"{store.url}/{REFS}/{ref_name(name)}", store.get(key, MAX_REF))
    if ref.index != name:
        raise StoreCorrupt(f"{store.url}/{REFS}/{ref_name(name)}",
                           f"the ref names index {ref.index!r}")
    return ref


def open_bundle(store: Store, name: str, folder: str) -> Image:
    """The bundle of the index name, fetched into folder and opened, its packs the store's.
    Its path (in messages and histories) is the ref's URL."""
    ref = read_ref(store, name)
    where = f"{store.url}/{BUNDLES}/{ref.bundle}"
    path = os.path.join(folder, f"{ref.bundle}.imagefs")
    digest = hashlib.sha256()
    head = b""
    want = 0
    packs_json = bytearray()
    with open(path, "wb") as out:
        for block in store.read(store.url.key(BUNDLES, ref.bundle), ref.size):
            digest.update(block)
            if len(head) < BUNDLE_HEAD.size:
                take = BUNDLE_HEAD.size - len(head)
                head += block[:take]
                block = block[take:]
                if len(head) == BUNDLE_HEAD.size:
                    want = decode_bundle_head(where, head)
            if len(head) == BUNDLE_HEAD.size and len(packs_json) < want:
                take = want - len(packs_json)
                packs_json += block[:take]
                block = block[take:]
            out.write(block)
    if digest.hexdigest() != ref.bundle:
        raise StoreCorrupt(where, "its content does not match its name")
    if len(head) < BUNDLE_HEAD.size or len(packs_json) < want:
        raise StoreCorrupt(where, "too short to be a bundle")
    packs = decode_pack_list(where, bytes(packs_json))
    f = BundleFile.open(path)
    try:
        f.attach(store, packs)
        f.path = f"{store.url}/{REFS}/{ref_name(name)}"
        image = Image(f)
    except BaseException:
        f.close()
        raise
    if [e.name for e in image.indices] != [name]:
        image.close()
        raise StoreCorrupt(where, f"the bundle does not hold index {name!r} alone")
    return image


def pull(url_text: str, selection: str, dest: str, endpoint: str | None = None,
         progress: Callable[[int], None] | None = None,
         on_total: Callable[[int], None] | None = None,
         who: dict[str, Any] | None = None, wait: float | None = None) -> Pulled:
    """Pull the indices selection names ("web", "web,db", "all") into dest."""
    url = parse_url(url_text)
    store = Store(url, endpoint)
    names = _selected(store, url, selection)
    if os.path.exists(dest) and not is_image_file(dest):
        raise DestinationError(dest, "exists and is not an imagefs image")
    with tempfile.TemporaryDirectory(prefix="imagefs-pull-") as folder:
        images: list[Image] = []
        try:
            for name in names:
                images.append(open_bundle(store, name, folder))
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
