"""Opening an index of a store as an image: its ref, its bundle (kept in a cache), its
packs read from the store through the cache (bundle_file.BundleFile).

What pull exports from, and what ls, cat, apply and mount read when IMAGE is
`s3://BUCKET/PREFIX`.
"""

from __future__ import annotations

import hashlib
import os

from imagefs.errors import NoSuchObject, StoreCorrupt
from imagefs.image import Image

from .bundle_file import BundleFile
from .cache import DEFAULT_LIMIT, StoreCache
from .client import Store, parse_url
from .layout import (
    BUNDLE_HEAD,
    BUNDLES,
    MAX_BUNDLE_JSON,
    MAX_REF,
    REFS,
    Ref,
    decode_bundle_head,
    decode_pack_list,
    index_of_ref,
    ref_name,
)


def ref_names(store: Store) -> list[str]:
    """The names of the indices the store holds (its refs), sorted."""
    base = store.url.key(REFS) + "/"
    return sorted(index_of_ref(o.key[len(base):]) for o in store.list(REFS)
                  if "/" not in o.key[len(base):])


def read_ref(store: Store, name: str) -> Ref:
    key = store.url.key(REFS, ref_name(name))
    try:
        data = store.get(key, MAX_REF)
    except NoSuchObject:
        held = ", ".join(ref_names(store)) or "none"
        raise NoSuchObject(str(store.url), f"no index named {name!r} (the store holds: "
                                           f"{held})") from None
    ref = Ref.decode(f"{store.url}/{REFS}/{ref_name(name)}", data)
    if ref.index != name:
        raise StoreCorrupt(f"{store.url}/{REFS}/{ref_name(name)}",
                           f"the ref names index {ref.index!r}")
    return ref


def open_store_index(url_text: str, name: str, endpoint: str | None = None,
                     cache_dir: str | None = None, cache_size: int = DEFAULT_LIMIT) -> Image:
    """The index name of the store at url_text, its objects cached in cache_dir (bounded
    by cache_size): what ls, cat, apply and mount read."""
    cache = StoreCache(cache_dir, cache_size)
    return open_index(Store(parse_url(url_text), endpoint), name, cache, cache)


def open_index(store: Store, name: str, cache: StoreCache,
               packs: StoreCache | None) -> Image:
    """The index name of the store, as an image holding it alone: its bundle fetched into
    cache once (then reused), its packs read from the store through packs (None: not
    kept).  Its path (in messages and histories) is the ref's URL."""
    ref = read_ref(store, name)
    where = f"{store.url}/{BUNDLES}/{ref.bundle}"
    path = cache.path(BUNDLES, f"{ref.bundle}.imagefs")
    listing = cache.path(BUNDLES, f"{ref.bundle}.packs")
    if not (os.path.exists(path) and os.path.exists(listing)):
        _fetch_bundle(store, ref, where, cache)
    with open(listing, "rb") as fh:
        pack_list = decode_pack_list(where, fh.read(MAX_BUNDLE_JSON + 1))
    f = BundleFile.open(path)
    try:
        f.attach(store, pack_list, packs)
        f.path = f"{store.url}/{REFS}/{ref_name(name)}"
        image = Image(f)
    except BaseException:
        f.close()
        raise
    if [e.name for e in image.indices] != [name]:
        image.close()
        raise StoreCorrupt(where, f"the bundle does not hold index {name!r} alone")
    return image


def _fetch_bundle(store: Store, ref: Ref, where: str, cache: StoreCache) -> None:
    """The bundle, checked against its name, into the cache: its pack list, then its file
    (each whole or not at all; the file last, as it is looked for first)."""
    path = cache.path(BUNDLES, f"{ref.bundle}.imagefs")
    digest = hashlib.sha256()
    head = b""
    want = 0
    packs_json = bytearray()
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with open(tmp, "wb") as out:
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
        decode_pack_list(where, bytes(packs_json))  # checked before it is kept
        cache.write(BUNDLES, f"{ref.bundle}.packs", bytes(packs_json))
        os.replace(tmp, path)
    finally:  # a failed fetch leaves nothing in the cache
        if os.path.exists(tmp):
            os.unlink(tmp)


