"""Crafted images whose every checksum is valid, so that tests reach the parsers behind them.

Start from a sound image written by the real writer (`make_base_image`: two indices of a
small tree whose names are unique and whose contents are known), then change it:

    with Editor(path) as ed:
        doc = ed.commit_doc()                        # the current commit record, as JSON
        block = ed.append_block([rec1, rec2])        # a metadata block (ref = block<<16|i)
        seg = ed.append_table([table_entry(...)])    # a chunk-table segment
        doc["indices"][1]["root"] = block << 16
        doc["tables"].append([seg, 1])
        ed.publish(doc)                              # commit frame + root slot, new generation

or with the one-shot functions:

- `rewrite_commit(path, doc)`: any Python object (or raw bytes) as the commit record,
  published with a valid frame and slot.  `Raw(text)` inside a document is written
  verbatim (`deep(n)`: nesting no Python encoder survives); lone surrogates in strings are
  written as JSON escapes (`"\\ud800"`), as a hostile writer would.
- `append_block(path, records)`, `append_record(path, record)`: a metadata block appended
  and published (the current commit record unchanged, or the one given).
- `append_table_segment(path, entries, count=None)`: a chunk-table segment, listed in the
  commit's `tables` with the count given (default: the number of entries; `list_segment`
  does the listing in a document, keeping "chunks" and "unique_bytes" as a writer would).
- `write_slot(path, which, generation, offset, length, digest=None)`: a root slot, its
  xxh3-128 (of the bytes it names, unless given) and its check right.
- `write_header(path, **fields)`: header fields changed, the header check recomputed.
- `add_index(editor, root, name)`: a tree of hand-made records (`Rec`) written as a new
  index, with the node digests, counts and link counts a writer would record (unless a
  Rec says otherwise), so that only what was crafted is wrong.
  `file_rec`, `dir_rec`, `link_rec` make the Recs (`ino` from test_hostile the Inodes).
- `expected_content(size, extents, packs)`: what a reader may serve for a file record:
  its bytes (holes as zeros) if every extent is well formed and its chunk checks out, else
  None (a reader must refuse it).
- `make_base_image(dir) -> Base`: the sound image, with what tests need to know of it: its
  files' contents, chunks (pack, offset, length, xxh3, sha256), decompressed packs, frames,
  record refs and roots.  `Base.copy(dest)` copies it for one test.
- Lower level: `frame_bytes`, `read_frame_raw`, `slot_bytes`, `read_slot`, `table_entry`,
  `encode_json`, `block_bytes` (from test_hostile).

Frames are written here, not by container.ImageFile, so that the crafted bytes do not
depend on the writer under test; only imagefs.format.layout's constants are shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
import zstandard
from test_hostile import block_bytes, ino

from imagefs.format import layout as F
from imagefs.format.digest import node_digest
from imagefs.format.records import Inode
from imagefs.image import capture

__all__ = [
    "HEADER_FIELDS", "LIMIT", "Base", "Chunk", "Editor", "Raw", "Rec", "TreeInfo",
    "add_index", "append_block", "append_record", "append_table_segment", "block_bytes",
    "deep", "dir_rec", "encode_json", "expected_content", "file_rec", "frame_bytes",
    "index_entry", "ino", "link_rec", "list_segment", "make_base_image", "new_uuid",
    "read_frame_raw", "read_slot", "rewrite_commit", "slot_bytes", "table_entry",
    "write_header", "write_slot",
]

LIMIT = 4 << 20  # bytes of a file compared (and read by tests): huge sparse files exist

# ---- JSON with verbatim parts ------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written verbatim where this object stands in a document."""

    text: str


def deep(n: int, kind: str = "list", leaf: str = "0") -> Raw:
    """JSON nested n levels deep: [[[...]]] or {"a":{"a":...}}."""
    if kind == "list":
        return Raw("[" * n + leaf + "]" * n)
    return Raw('{"a":' * n + leaf + "}" * n)


def encode_json(doc: Any) -> bytes:
    """doc as JSON bytes (sorted keys, no spaces, as the writer); Raw parts verbatim;
    strings escaped to ASCII, so lone surrogates become \\udXXX escapes."""
    raws: list[str] = []

    def swap(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [swap(v) for v in o]
        return o

    text = json.dumps(swap(doc), separators=(",", ":"), sort_keys=isinstance(doc, dict)
                      and all(isinstance(k, str) for k in doc))
    for i, r in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', r, 1)
    return text.encode("ascii")


# ---- frames, slots, header ---------------------------------------------------------------


def frame_bytes(kind: bytes, raw: bytes, codec: int = F.CODEC_ZSTD, level: int = 3,
                raw_len: int | None = None, payload: bytes | None = None) -> bytes:
    """A whole frame (40-byte header + payload) with valid checks.  payload overrides the
    stored bytes (then raw_len should say what they decompress to)."""
    if payload is None:
        payload = (zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
                   if codec == F.CODEC_ZSTD else raw)
    head = F.FRAME.pack(F.FRAME_MAGIC + kind, codec, len(payload),
                        len(raw) if raw_len is None else raw_len,
                        xxhash.xxh3_64_intdigest(payload))
    head += xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
    return head + payload


def read_frame_raw(fd: int, offset: int) -> tuple[bytes, bytes, int]:
    """(kind, decompressed payload, frame length) of the frame at offset, checks skipped."""
    head = os.pread(fd, F.FRAME_HEADER, offset)
    magic, codec, stored, rawlen, _check = F.FRAME.unpack_from(head)
    payload = os.pread(fd, stored, offset + F.FRAME_HEADER)
    if codec == F.CODEC_ZSTD:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=rawlen)
    else:
        raw = payload
    return magic[3:], raw, F.FRAME_HEADER + stored


def slot_bytes(generation: int, offset: int, length: int, digest: bytes,
               magic: bytes = F.SLOT_MAGIC, reserved: bytes = bytes(8),
               check: int | None = None) -> bytes:
    body = F.SLOT.pack(magic, generation, offset, length, digest, reserved)
    if check is None:
        check = xxhash.xxh3_64_intdigest(body)
    return body + check.to_bytes(8, "little")


def read_slot(path: str | Path, which: int) -> tuple[int, int, int, bytes] | None:
    """Slot A (0) or B (1) as (generation, offset, length, xxh3-128), None if never written
    or invalid."""
    with open(path, "rb") as fh:
        fh.seek(F.SLOT_OFFSETS[which])
        raw = fh.read(F.SLOT_SIZE)
    if len(raw) < F.SLOT_SIZE or raw == bytes(F.SLOT_SIZE):
        return None
    magic, gen, off, length, digest, _ = F.SLOT.unpack_from(raw)
    if magic != F.SLOT_MAGIC or int.from_bytes(raw[F.SLOT.size:], "little") != \
            xxhash.xxh3_64_intdigest(raw[:F.SLOT.size]):
        return None
    return gen, off, length, digest


def write_slot(path: str | Path, which: int, generation: int, offset: int, length: int,
               digest: bytes | None = None, magic: bytes = F.SLOT_MAGIC,
               reserved: bytes = bytes(8), check: int | None = None) -> bytes:
    """Write root slot A (0) or B (1).  digest: the xxh3-128 of the file's bytes
    [offset, offset + length) unless given (16 zero bytes where those lie past the end);
    the slot check is computed unless given.  Returns the 64 bytes written."""
    with open(path, "r+b") as fh:
        if digest is None:
            size = os.fstat(fh.fileno()).st_size
            if offset + length <= size and length <= 1 << 30:
                digest = xxhash.xxh3_128_digest(os.pread(fh.fileno(), length, offset))
            else:
                digest = bytes(16)
        raw = slot_bytes(generation, offset, length, digest, magic, reserved, check)
        os.pwrite(fh.fileno(), raw, F.SLOT_OFFSETS[which])
    return raw


HEADER_FIELDS = ("magic", "version", "header_size", "uuid", "chunk_min", "chunk_avg",
                 "chunk_max", "pack_target")


def write_header(path: str | Path, fix_check: bool = True, check: int | None = None,
                 **fields: Any) -> dict[str, Any]:
    """Change header fields (magic, version, header_size, uuid, chunk_min, chunk_avg,
    chunk_max, pack_target); the check at 48 recomputed unless fix_check is False or a
    check is given.  Returns the fields now in the header."""
    unknown = set(fields) - set(HEADER_FIELDS)
    assert not unknown, f"no header field(s) {unknown}"
    with open(path, "r+b") as fh:
        old = os.pread(fh.fileno(), F.HEADER.size + 8, 0)
        values = dict(zip(HEADER_FIELDS, F.HEADER.unpack_from(old), strict=True))
        values.update(fields)
        head = F.HEADER.pack(*(values[k] for k in HEADER_FIELDS))
        if check is None:
            check = (xxhash.xxh3_64_intdigest(head) if fix_check
                     else int.from_bytes(old[F.HEADER.size:], "little"))
        os.pwrite(fh.fileno(), head + check.to_bytes(8, "little"), 0)
    return values


def table_entry(xxh: bytes, sha: bytes, pack: int, offset: int, length: int) -> bytes:
    return F.CHUNK_ENTRY.pack(xxh, sha, pack, offset, length)


# ---- the editor --------------------------------------------------------------------------


class Editor:
    """Appends crafted frames after the current committed end and publishes a commit.

    The current state is the valid slot with the highest generation (as readers pick it);
    its commit is read without checks, so an editor works on an already hostile file too.
    Anything after the committed end is cut first, as a writer would."""

    def __init__(self, path: str | Path, truncate: bool = True) -> None:
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        slots = [read_slot(self.path, 0), read_slot(self.path, 1)]
        valid = [s for s in slots if s is not None]
        self.current = max(valid) if valid else None
        self.generation = self.current[0] if self.current else 0
        self.data_end = (self.current[1] + self.current[2] if self.current
                         else F.HEADER_SIZE)
        if truncate and os.fstat(self.fd).st_size > self.data_end:
            os.ftruncate(self.fd, self.data_end)
        self.pos = max(self.data_end, F.HEADER_SIZE) if truncate else os.fstat(self.fd).st_size

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading the current state --

    def commit_raw(self) -> bytes:
        """The current commit record's payload (JSON bytes), b"" for an empty image."""
        if self.current is None:
            return b""
        return read_frame_raw(self.fd, self.current[1])[1]

    def commit_doc(self) -> Any:
        raw = self.commit_raw()
        return json.loads(raw) if raw else {
            "chunks": 0, "created": "", "format": 1, "generation": 0, "indices": [],
            "stored_bytes": 0, "tables": [], "unique_bytes": 0}

    # -- appending --

    def append(self, data: bytes) -> int:
        off = self.pos
        view = memoryview(data)
        pos = off
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        self.pos = pos
        return off

    def append_frame(self, kind: bytes, raw: bytes, codec: int = F.CODEC_ZSTD,
                     level: int = 3, raw_len: int | None = None,
                     payload: bytes | None = None) -> int:
        """A frame with valid checks (see frame_bytes); its offset."""
        return self.append(frame_bytes(kind, raw, codec, level, raw_len, payload))

    def append_block(self, records: list[bytes], raw: bytes | None = None,
                     codec: int = F.CODEC_ZSTD) -> int:
        """A metadata block of these records (or the raw payload given); its offset.
        Record i's ref is offset << 16 | i."""
        return self.append_frame(F.KIND_META, block_bytes(records) if raw is None else raw,
                                 codec)

    def append_records(self, records: list[bytes]) -> list[int]:
        off = self.append_block(records)
        return [off << 16 | i for i in range(len(records))]

    def append_table(self, entries: list[bytes] | bytes, codec: int = F.CODEC_ZSTD) -> int:
        """A chunk-table segment (entries: table_entry()s, or raw payload bytes)."""
        raw = entries if isinstance(entries, bytes) else b"".join(entries)
        return self.append_frame(F.KIND_TABLE, raw, codec, level=1)

    def append_pack(self, chunks: list[bytes], codec: int = F.CODEC_ZSTD) -> int:
        """A pack of these chunks back to back; its offset (the pack id)."""
        return self.append_frame(F.KIND_PACK, b"".join(chunks), codec, level=1)

    # -- publishing --

    def publish(self, doc: Any, generation: int | None = None, slot: int | None = None,
                fix_generation: bool = True, codec: int = F.CODEC_ZSTD,
                digest: bytes | None = None) -> tuple[int, int, int]:
        """Append doc (a JSON-able object, Raw parts allowed, or raw bytes) as a commit
        frame and point a root slot at it: generation (default: current + 1, also written
        into a dict doc's "generation" unless fix_generation is False) into slot (default
        generation % 2), with the frame's xxh3-128 (or the digest given).  Returns
        (generation, offset, length)."""
        gen = self.generation + 1 if generation is None else generation
        if isinstance(doc, dict) and fix_generation:
            doc = {**doc, "generation": gen}
        raw = doc if isinstance(doc, bytes) else encode_json(doc)
        frame = frame_bytes(F.KIND_COMMIT, raw, codec)
        off = self.append(frame)
        write_slot(self.path, gen % 2 if slot is None else slot, gen & (1 << 64) - 1, off,
                   len(frame), xxhash.xxh3_128_digest(frame) if digest is None else digest)
        self.generation = gen
        self.current = (gen, off, len(frame), xxhash.xxh3_128_digest(frame))
        self.data_end = self.pos
        return gen, off, len(frame)


def rewrite_commit(path: str | Path, doc: Any, **publish: Any) -> tuple[int, int, int]:
    """Publish doc (any JSON-able object with Raw parts, or raw bytes) as the commit
    record; see Editor.publish for the keywords."""
    with Editor(path) as ed:
        return ed.publish(doc, **publish)


def append_block(path: str | Path, records: list[bytes], raw: bytes | None = None,
                 doc: Any = None) -> int:
    """A metadata block appended and published (with doc, or the current commit record);
    its offset."""
    with Editor(path) as ed:
        off = ed.append_block(records, raw)
        ed.publish(ed.commit_doc() if doc is None else doc)
        return off


def append_record(path: str | Path, record: bytes) -> int:
    """One record in a block of its own, published; its ref."""
    return append_block(path, [record]) << 16


def list_segment(doc: dict, offset: int, entries: list[bytes] | bytes,
                 count: int | None = None, replace: bool = False) -> None:
    """List a chunk-table segment in a commit document as [offset, count] (count default:
    its entries' number), after the others or (replace) alone; "chunks" and
    "unique_bytes" follow, as a writer keeps them."""
    raw = entries if isinstance(entries, bytes) else b"".join(entries)
    whole = raw[:len(raw) - len(raw) % F.CHUNK_ENTRY.size]
    n = len(whole) // F.CHUNK_ENTRY.size
    seg = [offset, n if count is None else count]
    if replace:
        doc["tables"], doc["chunks"], doc["unique_bytes"] = [seg], 0, 0
    else:
        doc["tables"] = [*doc["tables"], seg]
    with contextlib.suppress(TypeError, KeyError):
        doc["chunks"] += n
        doc["unique_bytes"] += sum(e[4] for e in F.CHUNK_ENTRY.iter_unpack(whole))


def append_table_segment(path: str | Path, entries: list[bytes] | bytes,
                         count: int | None = None, replace: bool = False) -> int:
    """A chunk-table segment appended, listed in the commit record (list_segment) and
    published; its offset."""
    with Editor(path) as ed:
        off = ed.append_table(entries)
        doc = ed.commit_doc()
        list_segment(doc, off, entries, count, replace)
        ed.publish(doc)
        return off


# ---- trees of hand-made records ----------------------------------------------------------

# (name, rec), (name, rec, kind): the entry's kind byte says kind, whatever rec is, or
# (name, ref, kind): a ref to anything.
Child = tuple[bytes, "Rec"] | tuple[bytes, "Rec", int] | tuple[bytes, int, int]


def _entry(c: Any) -> tuple[bytes, int, int]:
    """(name, kind, ref) of a Child."""
    if isinstance(c[1], Rec):
        return c[0], c[1].ino.kind if len(c) == 2 else c[2], c[1].ref
    return c[0], c[2], c[1]


def _child_rec(c: Any) -> Rec | None:
    return c[1] if isinstance(c[1], Rec) else None


@dataclass(eq=False)
class Rec:
    """One record of a crafted tree.  children: a directory's entries, in the order given
    (name, Rec), (name, Rec, kind) for an entry whose kind byte lies, or (name, ref, kind)
    for a ref to anything; a Rec named twice is one record
    (a hardlink, or a shared directory).  raw: the record's bytes verbatim.  With fix (the
    default) the writer's derived fields are filled in: a directory's size and nlink, a
    non-directory's nlink (its names in the tree), a symlink's size, every digest.  patch:
    (offset, bytes) written over the encoded record last."""

    ino: Inode
    children: list[Child] | None = None
    raw: bytes | None = None
    fix: bool = True
    patch: tuple[int, bytes] | None = None  # (offset, bytes) overwritten once encoded
    ref: int = 0
    digest: bytes = bytes(32)


def _order(root: Rec) -> list[Rec]:
    """Records children first (post-order), each once; cycles cut where they close."""
    out: list[Rec] = []
    seen: set[int] = set()
    stack: list[tuple[Rec, bool]] = [(root, False)]
    while stack:
        rec, expanded = stack.pop()
        if expanded:
            out.append(rec)
            continue
        if id(rec) in seen:
            continue
        seen.add(id(rec))
        stack.append((rec, True))
        for child in reversed(rec.children or []):
            sub = _child_rec(child)
            if sub is not None and id(sub) not in seen:
                stack.append((sub, False))
    return out


@dataclass
class TreeInfo:
    root: int
    digest: bytes
    files: int
    dirs: int
    bytes: int
    records: list[Rec] = field(default_factory=list)


def add_index(ed: Editor, root: Rec, name: str = "crafted",
              shas: dict[tuple[int, int], bytes] | None = None,
              description: str = "crafted", publish: bool = True,
              doc: Any = None, block_size: int = 0xFFFF) -> TreeInfo:
    """Write root's tree as a new index: records in metadata blocks (children first,
    block_size a block), the commit record listing it after the others; published unless
    publish is False (then the caller publishes ed.commit_doc()-based doc itself).
    shas: (pack, offset in pack) -> chunk SHA-256, for file digests (as verify computes
    them from the chunk table)."""
    shas = shas or {}
    order = _order(root)
    blocks: list[list[Rec]] = [order[i:i + block_size] for i in range(0, len(order),
                                                                        block_size)]
    names: dict[int, int] = {}
    for rec in order:
        for child in rec.children or []:
            sub = _child_rec(child)
            if sub is not None:
                names[id(sub)] = names.get(id(sub), 0) + 1
    if id(root) not in names:
        names[id(root)] = 1
    # Refs are assigned block by block just before each is written: entries may point
    # at records of earlier blocks and of their own block (an ancestor too: a cycle);
    # a ref into a later block is 0 (a tree fits one block unless block_size says less).
    for group in blocks:
        for i, rec in enumerate(group):
            rec.ref = ed.pos << 16 | i
        at = ed.append_block([_encode(rec, names, shas) for rec in group])
        assert at << 16 == group[0].ref
    files = dirs = nbytes = 0
    seen_files: set[int] = set()
    for rec in order:
        if rec.ino.kind == F.DIR:
            dirs += 1
            for child in rec.children or []:
                if _entry(child)[1] != F.DIR:
                    files += 1
        elif rec.ino.kind == F.REG and id(rec) not in seen_files:
            seen_files.add(id(rec))
            nbytes += rec.ino.size
    info = TreeInfo(root.ref, root.digest, files, dirs, nbytes, order)
    if publish:
        # A count past what a commit record may hold (2**62) would make the whole record
        # refused: say less, so that readers get to the records (verify then complains).
        limit = 1 << 62
        d = ed.commit_doc() if doc is None else doc
        d["indices"] = [*d.get("indices", []),
                        index_entry(name, info.root, info.digest.hex(), min(info.files, limit),
                                    min(info.dirs, limit), min(info.bytes, limit),
                                    description=description)]
        ed.publish(d)
    return info


def _encode(rec: Rec, names: dict[int, int], shas: dict[tuple[int, int], bytes]) -> bytes:
    if rec.raw is not None:
        return rec.raw
    i = rec.ino
    if rec.fix:
        if i.kind == F.DIR:
            kids = rec.children or []
            i.entries = [_entry(c) for c in kids]
            i.size = len(kids)
            i.nlink = 2 + sum(1 for _n, k, _r in i.entries if k == F.DIR)
            i.digest = node_digest(i, (), [c[1].digest if isinstance(c[1], Rec) else bytes(32)
                                           for c in kids])
        else:
            i.nlink = names.get(id(rec), 1)
            if i.kind == F.LNK:
                i.size = len(i.target)
            try:
                i.digest = node_digest(
                    i, [shas.get((e[1], e[2]), bytes(32)) for e in i.extents], ())
            except (struct.error, OverflowError):
                i.digest = bytes(32)
    elif i.kind == F.DIR and rec.children is not None:
        i.entries = [_entry(c) for c in rec.children]
    rec.digest = i.digest
    out = i.encode()
    if rec.patch is not None:
        at, data = rec.patch
        out = out[:at] + data + out[at + len(data):]
    return out


def index_entry(name: str, root: int, digest: str, files: int = 0, dirs: int = 1,
                nbytes: int = 0, description: str = "crafted",
                history: list[Any] | None = None) -> dict[str, Any]:
    """An index as the commit record lists it."""
    return {"bytes": nbytes, "created": "2026-01-01T00:00:00Z", "description": description,
            "digest": digest, "dirs": dirs, "files": files,
            "history": [{"action": "craft", "uid": 0, "user": "root",
                         "when": "2026-01-01T00:00:00Z"}] if history is None else history,
            "modified": "2026-01-01T00:00:00Z", "name": name, "root": root}


def file_rec(size: int, extents: list[tuple[int, int, int, int, bytes]] | None = None,
             **attrs: Any) -> Rec:
    i = ino(F.REG, size)
    i.extents = list(extents or [])
    for k, v in attrs.items():
        setattr(i, k, v)
    return Rec(i)


def dir_rec(children: list[Child], sort: bool = True, **attrs: Any) -> Rec:
    i = ino(F.DIR)
    for k, v in attrs.items():
        setattr(i, k, v)
    return Rec(i, sorted(children, key=lambda c: c[0]) if sort else list(children))


def link_rec(target: bytes, **attrs: Any) -> Rec:
    i = ino(F.LNK, len(target))
    i.target = target
    for k, v in attrs.items():
        setattr(i, k, v)
    return Rec(i)


# ---- what a reader may serve -------------------------------------------------------------


def expected_content(size: int, extents: list[tuple[int, int, int, int, bytes]],
                     packs: dict[int, bytes], limit: int = LIMIT) -> bytes | None:
    """The first `limit` bytes a reader may serve for a file record of this size and these
    extents (holes as zeros), or None if it must refuse: an extent out of order,
    overlapping, empty or past the size, or a chunk that is not in a pack (packs: pack
    offset -> decompressed payload) or whose xxh3-128 differs."""
    end = 0
    for foff, pack, poff, length, xxh in extents:
        if foff < end or length == 0 or foff + length > size:
            return None
        end = foff + length
        raw = packs.get(pack)
        if raw is None or poff + length > len(raw):
            return None
        if xxhash.xxh3_128_digest(raw[poff:poff + length]) != xxh:
            return None
    out = bytearray(min(size, limit))
    for foff, pack, poff, length, _xxh in extents:
        if foff >= limit:
            break
        n = min(length, limit - foff)
        out[foff:foff + n] = packs[pack][poff:poff + n]
    return bytes(out)


# ---- the sound image to start from -------------------------------------------------------


@dataclass
class Chunk:
    pack: int
    offset: int
    length: int
    xxh: bytes
    sha: bytes


class Base:
    """A sound image: index 1 "one" and index 2 "two" (2 = 1 + /only2.txt).  (A plain
    class: test reports show it by its path, not by its megabytes.)"""

    def __init__(self, path: Path, files: dict[str, bytes], only2: tuple[str, ...],
                 chunks: list[Chunk], packs: dict[int, bytes],
                 frames: list[tuple[int, bytes, int]], refs: list[int],
                 roots: list[int]) -> None:
        self.path = path
        self.files = files  # path -> content: every regular file of index 2 (and /link)
        self.only2 = only2  # paths in index 2 only
        self.chunks = chunks
        self.packs = packs  # pack offset -> decompressed payload
        self.frames = frames  # (offset, kind, length) of every frame
        self.refs = refs  # every record's ref
        self.roots = roots  # index 1's and 2's roots

    @property
    def shas(self) -> dict[tuple[int, int], bytes]:
        return {(c.pack, c.offset): c.sha for c in self.chunks}

    def __repr__(self) -> str:
        return f"Base({str(self.path)!r})"

    def copy(self, dest: str | Path) -> Path:
        shutil.copyfile(self.path, dest)
        return Path(dest)


def _tree(src: Path) -> dict[str, bytes]:
    rng = random.Random(1207)
    files = {
        "/hello.txt": b"hello\n",
        "/d/x.bin": rng.randbytes(5000),
        "/d/e/deep.txt": b"deep down\n" * 30,
        "/big.bin": rng.randbytes(200_000),
        "/empty": b"",
    }
    for p, data in files.items():
        (src / p[1:]).parent.mkdir(parents=True, exist_ok=True)
        (src / p[1:]).write_bytes(data)
    sparse = bytearray(1 << 20)
    sparse[:4096] = rng.randbytes(4096)
    sparse[600_000:604_096] = rng.randbytes(4096)
    with open(src / "sparse", "wb") as fh:
        fh.write(sparse[:4096])
        fh.seek(600_000)
        fh.write(sparse[600_000:604_096])
        fh.truncate(1 << 20)
    files["/sparse"] = bytes(sparse)
    os.symlink("hello.txt", src / "link")
    files["/link"] = files["/hello.txt"]
    os.mkfifo(src / "fifo")
    with contextlib.suppress(OSError):
        os.setxattr(src / "hello.txt", b"user.note", b"a note")
    return files


def make_base_image(directory: str | Path) -> Base:
    """Capture a small tree as index 1 "one", add /only2.txt and capture it as index 2
    "two" (level 1).  Every name in the tree is unique, so a file's path names its
    content whichever directory record a hostile file makes a root."""
    directory = Path(directory)
    src = directory / "base-src"
    src.mkdir(parents=True)
    files = _tree(src)
    img = directory / "base.ifs"
    capture(str(img), str(src), "one", description="index one", level=1)
    only2 = b"only in index two\n"
    (src / "only2.txt").write_bytes(only2)
    capture(str(img), str(src), "two", description="index two", level=1)
    files["/only2.txt"] = only2
    chunks: list[Chunk] = []
    packs: dict[int, bytes] = {}
    frames = []
    refs = []
    fd = os.open(img, os.O_RDONLY)
    try:
        pos, end = F.HEADER_SIZE, os.fstat(fd).st_size
        while pos < end:
            kind, raw, length = read_frame_raw(fd, pos)
            frames.append((pos, kind, length))
            if kind == F.KIND_PACK:
                packs[pos] = raw
            elif kind == F.KIND_META:
                refs.extend(pos << 16 | i for i in range(F.U32.unpack_from(raw)[0]))
            pos += length
        doc = json.loads(Editor(img, truncate=False).commit_raw())
        for off, _count in doc["tables"]:
            for xxh, sha, pack, poff, length in F.CHUNK_ENTRY.iter_unpack(
                    read_frame_raw(fd, off)[1]):
                chunks.append(Chunk(pack, poff, length, xxh, sha))
    finally:
        os.close(fd)
    for c in chunks:
        assert xxhash.xxh3_128_digest(packs[c.pack][c.offset:c.offset + c.length]) == c.xxh
        assert hashlib.sha256(packs[c.pack][c.offset:c.offset + c.length]).digest() == c.sha
    return Base(img, files, ("/only2.txt",), chunks, packs, frames, refs,
                [e["root"] for e in doc["indices"]])


def new_uuid() -> bytes:
    return uuid.uuid4().bytes
