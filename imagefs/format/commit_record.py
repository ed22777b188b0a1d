"""The commit record: the JSON payload of a commit frame, which lists every index of the
image file, every chunk-table segment and the committed end (see container.py for how it
is published, and docs/format.md).

Whoever crafts an image file can recompute its checksums, so a commit record is validated
field by field as it is decoded: numbers in range, offsets inside the file, text and
history bounded in size and depth.  A record that fails is a CorruptImage, never an
exception from deep inside a reader.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from imagefs.errors import CorruptImage, UnsupportedVersion

from . import layout as F


@dataclass
class IndexEntry:
    """One image (index) of the file, as the commit record lists it."""

    name: str
    description: str
    created: str
    modified: str
    files: int
    dirs: int
    bytes: int
    root: int
    digest: str
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Commit:
    """The published state: the JSON payload of a commit frame."""

    generation: int = 0
    data_end: int = F.HEADER_SIZE
    created: str = ""
    tables: list[list[int]] = field(default_factory=list)  # [frame offset, chunk count]
    chunks: int = 0
    unique_bytes: int = 0
    stored_bytes: int = 0
    indices: list[IndexEntry] = field(default_factory=list)

    def encode(self) -> bytes:
        # Field by field, not dataclasses.asdict: that deep-copies every history entry,
        # which took 8 s of a commit listing 50 000 indices.
        doc: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name != "data_end"}  # the root slot says data_end
        doc["indices"] = [{f.name: getattr(e, f.name) for f in fields(e)}
                          for e in self.indices]
        doc["format"] = F.FORMAT_VERSION
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str, file_size: int) -> Commit:
        """Parse and check a commit payload; anything unexpected is CorruptImage."""
        try:
            doc = json.loads(raw.decode())
        except RecursionError:
            raise CorruptImage(where, "commit record is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptImage(where, f"commit record is not valid JSON ({e})") from None
        fmt = doc.get("format") if type(doc) is dict else None
        if type(fmt) is int and fmt > F.FORMAT_VERSION:
            raise UnsupportedVersion(where, fmt, F.FORMAT_VERSION)
        try:
            return cls._from_doc(doc, file_size)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CorruptImage(where, f"commit record is malformed ({e})") from None

    @classmethod
    def _from_doc(cls, doc: Any, file_size: int) -> Commit:
        if type(doc) is not dict:
            raise TypeError("not an object")
        _number(doc["format"])
        tables = _tables(doc["tables"], file_size)
        chunks = _number(doc["chunks"])
        indices = []
        for e in _list(doc["indices"], "indices"):
            if type(e) is not dict:
                raise TypeError("an index entry is not an object")
            indices.append(IndexEntry(
                name=_text(e["name"]), description=_text(e["description"]),
                created=_text(e["created"]), modified=_text(e["modified"]),
                files=_number(e["files"]), dirs=_number(e["dirs"]),
                bytes=_number(e["bytes"]), root=_number(e["root"], file_size << 16),
                digest=_text(e["digest"]), history=_history(e["history"]),
            ))
        return cls(
            generation=_number(doc["generation"]),
            created=_text(doc["created"]), tables=tables, chunks=chunks,
            unique_bytes=_number(doc["unique_bytes"]),
            stored_bytes=_number(doc["stored_bytes"]), indices=indices,
        )


# Bounds on a commit record's content, whatever a (hostile) file holds.
MAX_HISTORY_DEPTH = 16  # nesting of a history entry's values (results are a few levels)
MAX_TEXT = 65536


def _number(v: Any, limit: int = 1 << 62) -> int:
    if type(v) is not int or not 0 <= v <= limit:
        raise ValueError(f"bad number {_short(v)}")
    return v


def _text(v: Any) -> str:
    """A string that can be printed and written back: bounded, and valid UTF-8 (JSON
    admits lone surrogates such as "\ud800", which no terminal or encoder takes)."""
    if type(v) is not str or len(v) > MAX_TEXT:
        raise ValueError(f"bad string {_short(v)}")
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ValueError(f"a string that is not valid UTF-8: {_short(v)}") from None
    return v


def _list(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        raise TypeError(f"{what} is not a list")
    return v


def _tables(v: Any, file_size: int) -> list[list[int]]:
    """The chunk-table segments: [offset, count] pairs, each listed once (a segment listed
    again would be loaded, and cost, again: a repeated reference is damage)."""
    tables = []
    seen: set[int] = set()
    for t in _list(v, "tables"):
        if type(t) is not list or len(t) != 2:
            raise ValueError(f"a chunk-table entry is not [offset, count]: {_short(t)}")
        off, count = _number(t[0], file_size), _number(t[1], file_size)
        if off in seen:
            raise ValueError(f"chunk-table segment at offset {off} is listed twice")
        seen.add(off)
        tables.append([off, count])
    if len(tables) > F.MAX_TABLE_SEGMENTS:
        raise ValueError(f"{len(tables)} chunk-table segments (at most "
                         f"{F.MAX_TABLE_SEGMENTS} are written)")
    return tables


def _history(v: Any) -> list[dict[str, Any]]:
    """An index's history: a list of objects whose values are JSON of bounded depth, with
    printable strings (checked without recursion, so no nesting can overflow the stack)."""
    hist = _list(v, "history")
    pending: list[tuple[Any, int]] = [(h, 1) for h in hist]
    if any(type(h) is not dict for h in hist):
        raise ValueError("a history entry is not an object")
    while pending:
        item, depth = pending.pop()
        if depth > MAX_HISTORY_DEPTH:
            raise ValueError(f"history nested deeper than {MAX_HISTORY_DEPTH} levels")
        if type(item) is dict:
            for key, value in item.items():
                _text(key)
                pending.append((value, depth + 1))
        elif type(item) is list:
            pending.extend((value, depth + 1) for value in item)
        elif type(item) is str:
            _text(item)
        elif type(item) is float and not math.isfinite(item):
            raise ValueError("a number that is not finite in history")
        elif item is not None and type(item) not in (int, float, bool):
            raise ValueError("a history value of unknown type")
    return hist


def _short(v: Any) -> str:
    """A value for an error message: its repr, cut short (and safe to print)."""
    try:
        text = repr(v)
    except RecursionError:
        text = f"<nested {type(v).__name__}>"
    text = text.encode("utf-8", "backslashreplace").decode()
    return text if len(text) <= 60 else text[:57] + "..."
