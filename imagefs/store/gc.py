"""imagefs gc: remove the objects of a store that no ref reaches.

Safe while other servers push (docs/store.md, "Garbage collection"): gc lists the refs,
reads the pack list of each ref's bundle, and removes only objects that none of them
reaches AND that are older than the grace period.  A push writes its packs and bundle
before its ref, and touches every object it reuses that is older than touch_after()
(push.py; gc's grace must be at least twice that), so while a push runs (for less than the
grace less that) everything it relies on is younger than the grace period: gc spares it
even though no ref reaches it yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from imagefs.errors import NoSuchObject, StoreCorrupt, UsageError

from .client import ObjectInfo, Store, parse_url
from .layout import (
    BUNDLE_HEAD,
    BUNDLES,
    MAX_BUNDLE_JSON,
    PACKS,
    decode_bundle_head,
    decode_pack_list,
)
from .push import TOUCH_ENV, touch_after
from .remote import read_ref, ref_names

GRACE = timedelta(hours=24)


@dataclass
class Collected:
    refs: int = 0
    kept: int = 0
    removed: list[str] = field(default_factory=list)  # object names (PACKS/SHA, ...)
    removed_bytes: int = 0
    young: int = 0  # unreached, but within the grace period

    def to_json(self) -> dict[str, Any]:
        return {"refs": self.refs, "kept": self.kept, "removed": len(self.removed),
                "removed_bytes": self.removed_bytes, "spared_young": self.young}


def gc(url_text: str, endpoint: str | None = None, dry_run: bool = False,
       grace: timedelta = GRACE) -> Collected:
    least = 2 * touch_after()
    if grace < least:
        raise UsageError(f"--grace {grace}: at least twice what pushes wait before they touch "
                         f"an object they reuse ({least}; ${TOUCH_ENV})")
    store = Store(parse_url(url_text), endpoint)
    out = Collected()
    reached: set[str] = set()
    for name in ref_names(store):
        try:
            ref = read_ref(store, name)
        except NoSuchObject:  # removed since it was listed
            continue
        out.refs += 1
        reached.add(f"{BUNDLES}/{ref.bundle}")
        reached.update(f"{PACKS}/{sha}" for sha in _packs_of(store, ref.bundle, ref.size))
    now = datetime.now(UTC)
    for folder in (BUNDLES, PACKS):
        for obj in list(store.list(folder)):
            name = _name(store, obj)
            if name in reached:
                out.kept += 1
            elif now - obj.modified < grace:
                out.young += 1
            elif dry_run or _still_old(store, obj.key, now - grace):
                if not dry_run:
                    store.delete(obj.key)
                out.removed.append(name)
                out.removed_bytes += obj.size
            else:  # touched by a push since it was listed
                out.young += 1
    return out


def _still_old(store: Store, key: str, before: datetime) -> bool:
    """Looked at again just before it goes: a push may have touched it since the listing
    (what is left is the moment between this look and the delete)."""
    have = store.head(key)
    return have is not None and have.modified < before


def _name(store: Store, obj: ObjectInfo) -> str:
    base = store.url.key() + "/" if store.url.prefix else ""
    return obj.key[len(base):]


def _packs_of(store: Store, bundle: str, size: int) -> list[str]:
    """The pack objects a bundle names: its head and pack list only (a ranged read)."""
    where = f"{store.url}/{BUNDLES}/{bundle}"
    key = store.url.key(BUNDLES, bundle)
    head = store.get_range(key, 0, BUNDLE_HEAD.size)
    length = decode_bundle_head(where, head)
    if BUNDLE_HEAD.size + length > size or length > MAX_BUNDLE_JSON:
        raise StoreCorrupt(where, "shorter than its pack list")
    listing = store.get_range(key, BUNDLE_HEAD.size, length)
    return sorted({p.sha256 for p in decode_pack_list(where, listing).values()})

