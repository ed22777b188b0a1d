"""imagefs push: indices of an image file into a store, uploading only what it lacks.

For each index, in this order (docs/store.md, "Pushing"):

1. every pack holding a chunk the index uses goes up as its frame, as stored, named by its
   SHA-256, unless the store has it (one HEAD each; an object older than TOUCH_AFTER is
   touched so that a concurrent gc spares it);
2. the index's bundle: its records, moved into a small imagefs file whose chunk table lists
   every chunk of those packs under the pack ids they have here (relocate.RecordMover,
   as export moves records; the digest is recomputed and must match), with the pack list;
3. last, its ref: from then on readers see the new index; until then, the old one.

Nothing of the image file changes.  A push killed at any moment leaves objects no ref
reaches (gc removes them) and every ref as it was or new.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from imagefs.errors import CorruptImage, NoSuchObject, UsageError
from imagefs.format import layout as F
from imagefs.format.container import ImageFile, now_iso
from imagefs.format.packs import ChunkLoc, ChunkTable
from imagefs.format.records import Inode, MetaReader
from imagefs.format.relocate import ChunkKey, ChunkUse, RecordMover, used_chunks
from imagefs.format.view import IndexView
from imagefs.format.writer import Transaction, add_index, history_entry
from imagefs.image import Image

from .client import Store, parse_url
from .layout import BUNDLES, PACKS, REFS, PackObject, Ref, digest_of, encode_bundle, ref_name
from .scratch import scratch

META_CACHE = 4 << 20
UPLOADERS = 4  # packs read, hashed and sent at once
BUNDLE_LEVEL = 19  # records are pulled once per index and site: worth making them small
TOUCH_ENV = "IMAGEFS_STORE_TOUCH_AFTER"  # seconds; gc's grace must be at least twice it


def touch_after() -> timedelta:
    """How old a reused object may be before a push makes it young again (default an
    hour; $IMAGEFS_STORE_TOUCH_AFTER seconds, the same on every pusher and on gc's host)."""
    try:
        return timedelta(seconds=max(1, int(os.environ.get(TOUCH_ENV, "3600"))))
    except ValueError:
        raise UsageError(f"${TOUCH_ENV} must be a number of seconds") from None


@dataclass
class Pushed:
    """One index pushed: what its ref names, and what had to move."""

    index: int
    name: str
    bundle: str
    packs: int  # pack objects the index uses
    packs_sent: int  # of which the store lacked
    bytes_sent: int  # packs and bundle

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "bundle": self.bundle,
                "packs": self.packs, "packs_sent": self.packs_sent,
                "bytes_sent": self.bytes_sent}


def push(image_path: str, selection: str, url_text: str, endpoint: str | None = None,
         progress: Callable[[int], None] | None = None,
         on_total: Callable[[int], None] | None = None,
         who: dict[str, Any] | None = None) -> list[Pushed]:
    """Push the selected indices ("2", "web,3", "all") of the image to the store."""
    url = parse_url(url_text)
    with Image.open(image_path) as image:
        numbers = [n for n, _e in image.select_many(selection)]
        if not numbers:
            raise UsageError(f"{image_path}: no indices to push")
        for n in numbers:
            ref_name(image.indices[n - 1].name)  # refuses an unnamed index before any upload
        store = Store(url, endpoint)
        store.ensure_bucket()
        chunks: dict[int, list[ChunkLoc]] = {}
        for loc in ChunkTable.load(image.file, image.commit).all():
            chunks.setdefault(loc.pack_id(), []).append(loc)
        meta = MetaReader(image.file, META_CACHE)
        views = [IndexView(image.file, n, image.indices[n - 1], meta) for n in numbers]
        if on_total:
            on_total(sum(v.entry.bytes for v in views))
        done = []
        for view in views:
            directories: dict[int, Inode] = {}
            used = used_chunks([view], directories)
            before = store.sent
            touched: list[tuple[str, Callable[[], bytes]]] = []
            packs, sent = _send_packs(store, image.file, sorted(used), touched)
            body = encode_bundle(packs, _bundle_image(image, view, used, chunks, directories,
                                                      who, str(url)))
            bundle = digest_of(body)
            touched_bundle: list[tuple[str, Callable[[], bytes]]] = []
            _send(store, store.url.key(BUNDLES, bundle), body, touched_bundle,
                  lambda body=body: body)  # type: ignore[misc]
            sent += _confirm(store, touched)  # the packs, then the bundle: last of all
            _confirm(store, touched_bundle)
            ref = Ref(view.entry.name, bundle, len(body), now_iso(), view.entry.digest)
            store.put(store.url.key(REFS, ref_name(view.entry.name)), ref.encode())
            done.append(Pushed(view.number, view.entry.name, bundle, len(packs), sent,
                               store.sent - before))
            if progress:
                progress(view.entry.bytes)
        return done


def _send_packs(store: Store, file: ImageFile, packs: list[int],
                touched: list[tuple[str, Callable[[], bytes]]]
                ) -> tuple[dict[int, PackObject], int]:
    """Upload each pack the store lacks; pack id -> its object, and how many were sent.
    touched gets each pack the store had, old, and that was touched (see _confirm)."""

    def one(pack: int) -> tuple[int, PackObject, bool]:
        frame = _frame(file, pack)
        sha = digest_of(frame)
        return pack, PackObject(sha, len(frame)), _send(
            store, store.url.key(PACKS, sha), frame, touched, lambda: _frame(file, pack))

    out: dict[int, PackObject] = {}
    sent = 0
    with ThreadPoolExecutor(UPLOADERS) as pool:
        for pack, obj, new in pool.map(one, packs):
            out[pack] = obj
            sent += new
    return out, sent


def _frame(file: ImageFile, pack: int) -> bytes:
    """The pack's frame as the image stores it (its checksum checked)."""
    _info, payload = file.read_stored(pack, F.KIND_PACK)
    return os.pread(file.fd, F.FRAME_HEADER, pack) + payload


def _send(store: Store, key: str, data: bytes,
          touched: list[tuple[str, Callable[[], bytes]]], again: Callable[[], bytes]) -> bool:
    """Put a content-addressed object unless the store has it (touched when old, and then
    listed in touched with how to make its bytes again); True when it was sent."""
    have = store.head(key)
    if have is None or have.size != len(data):
        store.put(key, data)
        return True
    if datetime.now(UTC) - have.modified > touch_after():
        try:
            store.touch(key)
        except NoSuchObject:  # gc removed it since the HEAD: send it after all
            store.put(key, data)
            return True
        touched.append((key, again))
    return False


def _confirm(store: Store, touched: list[tuple[str, Callable[[], bytes]]]) -> int:
    """Just before the ref: every object this push touched rather than sent is still there,
    or is sent again; how many were.  A gc that looked at one just before the touch (it was
    old) may delete it just after (gc.py's _still_old leaves that moment), and the ref
    would name a pack the store no longer has."""
    sent = 0
    for key, again in touched:
        if store.head(key) is None:
            store.put(key, again())
            sent += 1
    return sent


def _bundle_image(image: Image, view: IndexView, used: dict[int, set[ChunkUse]],
                  chunks: dict[int, list[ChunkLoc]], directories: dict[int, Inode],
                  who: dict[str, Any] | None, url: str) -> bytes:
    """The imagefs file of the index's bundle: its records (moved), the chunks of its packs
    under their pack ids here, and a commit naming it."""
    moved: dict[ChunkKey, ChunkLoc] = {}
    listed: list[ChunkLoc] = []
    for pack, uses in used.items():
        have = chunks.get(pack, [])
        if not uses <= {(c.offset, c.length, c.xxh) for c in have}:
            raise CorruptImage(image.path, f"index {view.number} uses a chunk of the pack at "
                                           f"offset {pack} that the chunk table does not "
                                           "list; run `imagefs verify`")
        for c in have:
            loc = ChunkLoc(pack, c.offset, c.length, c.xxh, c.sha)
            listed.append(loc)
            moved[(pack, c.offset, c.length, c.xxh)] = loc
    with scratch("push") as tmp:
        path = os.path.join(tmp, "bundle.imagefs")
        ImageFile.create(path, image.file.header.pack_target)
        with ImageFile.open(path, writable=True) as out, Transaction(out, BUNDLE_LEVEL) as tx:
            table = tx.pack_writer().table
            for loc in listed:
                table.add(loc)
            tx.finish_packs()
            with tx.metadata() as out_meta:
                stats = RecordMover(out_meta, moved, None, directories).move(view)
                if stats.digest.hex() != view.entry.digest:
                    raise CorruptImage(image.path, f"index {view.number} does not match its "
                                                   "digest; run `imagefs verify`")
                entry = view.entry
                add_index(tx.commit, entry.name, entry.description, stats,
                          history_entry("push", who, store=url,
                                        source=os.path.abspath(image.path),
                                        source_index=view.number),
                          created=entry.created, old_history=entry.history)
            tx.publish()
        with open(path, "rb") as fh:
            return fh.read()
