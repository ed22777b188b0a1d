"""The store's objects: their names, and the bundle and ref documents (docs/store.md).

    PREFIX/packs/SHA256     a pack frame as an image file stores it
    PREFIX/bundles/SHA256   an index's bundle: MAGIC, u32 length, JSON, then an imagefs file
    PREFIX/refs/NAME        {"format": 1, "index": NAME, "bundle": SHA256, "bytes": N, ...}

Objects under packs/ and bundles/ are named by the SHA-256 of their bytes and never change;
a ref is rewritten to publish a new state of its index.  Everything read back is bounded
and checked before it is used: sizes against the limits below, names against content.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from imagefs.errors import StoreCorrupt, UsageError, one_line
from imagefs.format import layout as F

PACKS, BUNDLES, REFS = "packs", "bundles", "refs"
FORMAT = 1
BUNDLE_MAGIC = b"imagefs-bundle\x00\x01"
BUNDLE_HEAD = struct.Struct("<16sI")
MAX_PACK_OBJECT = F.FRAME_HEADER + F.MAX_RAW[F.KIND_PACK] + (F.MAX_RAW[F.KIND_PACK] >> 7) + 1024
MAX_BUNDLE = 1 << 30  # an index's records and tables: ~100 MB for millions of files
MAX_BUNDLE_JSON = 64 << 20  # the pack list: ~100 bytes a pack
MAX_REF = 64 << 10
SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def ref_name(index_name: str) -> str:
    """An index's name as an object name: percent-encoded, so that any name is one plain
    path part."""
    if not index_name:
        raise UsageError("an index needs a name to be pushed")
    return quote(index_name, safe="")


def index_of_ref(name: str) -> str:
    return unquote(name)


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PackObject:
    """The object a pack id of a bundle stands for."""

    sha256: str
    size: int  # the frame's bytes, header included


@dataclass
class Ref:
    index: str
    bundle: str
    size: int
    pushed: str
    digest: str

    def encode(self) -> bytes:
        return json.dumps({"format": FORMAT, "index": self.index, "bundle": self.bundle,
                           "bytes": self.size, "pushed": self.pushed,
                           "digest": self.digest}, sort_keys=True).encode()

    @classmethod
    def decode(cls, where: str, data: bytes) -> Ref:
        doc = _json(where, data)
        try:
            ref = cls(str(doc["index"]), str(doc["bundle"]), int(doc["bytes"]),
                      str(doc.get("pushed", "")), str(doc.get("digest", "")))
        except (KeyError, TypeError, ValueError):
            raise StoreCorrupt(where, "not an imagefs ref") from None
        if doc.get("format") != FORMAT:
            raise StoreCorrupt(where, f"ref format {one_line(str(doc.get('format')))} is "
                                      f"not {FORMAT}")
        if not SHA256.match(ref.bundle) or not 0 < ref.size <= MAX_BUNDLE:
            raise StoreCorrupt(where, "the ref names no valid bundle")
        return ref


def encode_bundle(packs: dict[int, PackObject], image_bytes: bytes) -> bytes:
    """A bundle: the pack list (pack id -> object) and the imagefs file of the index."""
    doc = json.dumps({"format": FORMAT,
                      "packs": [[pid, p.sha256, p.size] for pid, p in sorted(packs.items())]},
                     separators=(",", ":")).encode()
    return BUNDLE_HEAD.pack(BUNDLE_MAGIC, len(doc)) + doc + image_bytes


def decode_bundle_head(where: str, head: bytes) -> int:
    """The JSON's length, from the bundle's first BUNDLE_HEAD.size bytes."""
    if len(head) < BUNDLE_HEAD.size:
        raise StoreCorrupt(where, "too short to be a bundle")
    magic, length = BUNDLE_HEAD.unpack_from(head)
    if magic != BUNDLE_MAGIC:
        raise StoreCorrupt(where, "not an imagefs bundle")
    if length > MAX_BUNDLE_JSON:
        raise StoreCorrupt(where, f"claims a pack list of {length} bytes")
    return length


def decode_pack_list(where: str, data: bytes) -> dict[int, PackObject]:
    doc = _json(where, data)
    if doc.get("format") != FORMAT or not isinstance(doc.get("packs"), list):
        raise StoreCorrupt(where, "not an imagefs bundle's pack list")
    packs: dict[int, PackObject] = {}
    for item in doc["packs"]:
        if (not isinstance(item, list) or len(item) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool)
                           for v in (item[0], item[2]))
                or not isinstance(item[1], str) or not SHA256.match(item[1])
                or not F.HEADER_SIZE <= item[0] < 1 << 62
                or not F.FRAME_HEADER < item[2] <= MAX_PACK_OBJECT):
            raise StoreCorrupt(where, f"a bad pack entry: {one_line(str(item)[:80])}")
        packs[item[0]] = PackObject(item[1], item[2])
    return packs


def _json(where: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise StoreCorrupt(where, "not JSON") from None
    if not isinstance(doc, dict):
        raise StoreCorrupt(where, "not a JSON object")
    return doc
