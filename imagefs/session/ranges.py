"""Byte ranges of a file, kept sorted and merged: which parts of a staged file are the data
file's (the rest still comes from the base index).

A module of its own because three places use them and none owns them: staging stores and
loads them (`encode`/`decode`, the `staged` column), the session tree grows and cuts them as
files are written and truncated, and commit walks them to find what to re-chunk.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator

_PAIR = struct.Struct("<QQ")


class Ranges:
    """Sorted, disjoint, non-adjacent [start, end) byte ranges."""

    __slots__ = ("starts", "ends")

    def __init__(self, pairs: list[tuple[int, int]] | None = None) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for a, b in pairs or []:
            self.add(a, b)

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.starts, self.ends, strict=True)

    def add(self, a: int, b: int) -> None:
        if b <= a:
            return
        i = bisect.bisect_left(self.ends, a)  # first range that ends at or after a
        j = bisect.bisect_right(self.starts, b)  # ranges before j start at or before b
        if i < j:
            a = min(a, self.starts[i])
            b = max(b, self.ends[j - 1])
        self.starts[i:j] = [a]
        self.ends[i:j] = [b]

    def cut(self, limit: int) -> None:
        """Forget everything at or past limit."""
        i = bisect.bisect_left(self.ends, limit + 1)
        del self.starts[i + 1:], self.ends[i + 1:]
        if i < len(self.starts):
            if self.starts[i] >= limit:
                del self.starts[i], self.ends[i]
            else:
                self.ends[i] = limit

    def pieces(self, a: int, b: int) -> Iterator[tuple[int, int, bool]]:
        """[start, end, inside] pieces that tile [a, b)."""
        i = bisect.bisect_right(self.ends, a)
        pos = a
        while pos < b:
            if i < len(self.starts) and self.starts[i] <= pos:
                end = min(b, self.ends[i])
                yield pos, end, True
                i += 1
            else:
                end = min(b, self.starts[i]) if i < len(self.starts) else b
                yield pos, end, False
            pos = end

    def gaps(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        for s, e, inside in self.pieces(a, b):
            if not inside:
                yield s, e

    def covers(self, a: int, b: int) -> bool:
        i = bisect.bisect_right(self.starts, a) - 1
        return i >= 0 and self.ends[i] >= b

    def encode(self) -> bytes:
        return b"".join(_PAIR.pack(a, b) for a, b in self)

    @classmethod
    def decode(cls, raw: bytes) -> Ranges:
        r = cls()
        for a, b in _PAIR.iter_unpack(raw):
            r.starts.append(a)
            r.ends.append(b)
        return r
