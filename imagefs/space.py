"""Where an image file's bytes go: what each index's content takes, and what no index
uses any more (what `imagefs optimize` would drop), for `info --space`.

A chunk's stored bytes are its share of its pack's frame: its length times the pack's
stored/raw ratio.  An index's stored bytes are those of the distinct chunks its files use
(content shared by several indices counts for each); the reclaimable bytes are those of the
chunks in the file's table that no index uses.  Reading every index's records, this costs
about what `ls -R` of every index does; indices with the same root are read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagefs.format import layout as F
from imagefs.format.packs import ChunkTable
from imagefs.format.records import MetaReader
from imagefs.format.relocate import used_chunks
from imagefs.format.view import IndexView

from .image import Image


@dataclass
class Space:
    index_stored: list[int]  # per index, in order: stored bytes of the chunks it uses
    index_content: list[int]  # per index: raw bytes of those chunks (each counted once)
    reclaimable_bytes: int  # stored bytes of the chunks no index uses
    reclaimable_chunks: int


def space(image: Image) -> Space:
    table = ChunkTable.load(image.file, image.commit)
    ratio: dict[int, float] = {}
    for loc in table.all():
        pack = loc.pack_id()
        if pack not in ratio:
            info = image.file.frame_info(pack, F.KIND_PACK)
            ratio[pack] = (F.FRAME_HEADER + info.stored) / max(info.raw, 1)
    meta = MetaReader(image.file, 8 << 20)
    used_by_root: dict[int, set[tuple[int, int, int]]] = {}
    everything: set[tuple[int, int]] = set()
    stored, content = [], []
    for number, entry in enumerate(image.indices, 1):
        used = used_by_root.get(entry.root)
        if used is None:
            used = used_by_root[entry.root] = _chunks(IndexView(image.file, number, entry,
                                                                meta))
        everything.update((pack, poff) for pack, poff, _length in used)
        stored.append(round(sum(length * ratio.get(pack, 1.0) for pack, _p, length in used)))
        content.append(sum(length for _pack, _poff, length in used))
    unused = [loc for loc in table.all() if (loc.pack_id(), loc.offset) not in everything]
    return Space(stored, content,
                 round(sum(loc.length * ratio[loc.pack_id()] for loc in unused)), len(unused))


def describe_space(image: Image, doc: dict[str, Any]) -> None:
    """Add `info --space`'s figures to what Image.describe() gave (CLI and daemon)."""
    found = space(image)
    doc["reclaimable_bytes"] = found.reclaimable_bytes
    doc["reclaimable_chunks"] = found.reclaimable_chunks
    for e in doc["indices"]:
        e["stored_bytes"] = found.index_stored[e["index"] - 1]
        e["content_bytes"] = found.index_content[e["index"] - 1]


def _chunks(view: IndexView) -> set[tuple[int, int, int]]:
    """(pack, offset in it, length) of every chunk the index's files use."""
    return {(pack, poff, length) for pack, uses in used_chunks([view]).items()
            for poff, length, _xxh in uses}
