"""Packs compressed ahead of a commit (imagefs.format.ahead, PackWriter.offer).

A pack compressed ahead is written as it is only when the commit stores every chunk in it;
the chunks a commit stores from any other pack are compressed again with the rest, so what
was guessed and never stored costs no byte of the image.  Content the image already holds
is never compressed ahead.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

from pyfastcdc.cy import FastCDC

from imagefs.format.ahead import CompressAhead
from imagefs.format.chunking import chunk_region
from imagefs.format.container import ImageFile
from imagefs.format.packs import ChunkLoc, PackReader, PrecompressedPack
from imagefs.format.writer import Transaction

LEVEL = 19


def _content(seed: int, size: int) -> bytes:
    """Compressible (text-like) but unique bytes."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghij", k=rnd.randint(2, 9))) for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" "
    return bytes(out[:size])


def _ahead(path: str, contents: Iterable[bytes], budget: int = 64 << 20
           ) -> list[PrecompressedPack]:
    items = list(contents)
    return CompressAhead(path, LEVEL, lambda: items, budget=budget).start().packs()


def _commit(path: str, contents: list[bytes], offered: list[PrecompressedPack]
            ) -> list[list[tuple[int, ChunkLoc]]]:
    """Store contents as a commit does (chunk_region, the image's chunk sizes), offered the
    packs; the chunks of each content."""
    with ImageFile.open(path, writable=True) as f, \
            Transaction(f, 3, offered=offered) as tx:
        h = f.header
        cdc = FastCDC(avg_size=h.chunk_avg, min_size=h.chunk_min, max_size=h.chunk_max)
        packs = tx.pack_writer()
        out = []
        for data in contents:
            view = memoryview(data)
            out.append(chunk_region(lambda o, n, v=view: v[o:o + n], 0, len(data), cdc,
                                    h.chunk_min, packs.add_chunk))
        tx.finish_packs()
        tx.publish()
    return out


def _read_back(path: str, locs: list[tuple[int, ChunkLoc]]) -> bytes:
    with ImageFile.open(path) as f:
        reader = PackReader(f)
        return b"".join(reader.read_chunk(loc.pack_id(), loc.offset, loc.length, loc.xxh)
                        for _off, loc in locs)


def _image(tmp_path: Path) -> str:
    path = str(tmp_path / "image.ifs")
    ImageFile.create(path)
    return path


def test_a_pack_whose_every_chunk_is_stored_is_written_as_it_was_compressed(
        tmp_path: Path) -> None:
    path = _image(tmp_path)
    x, y = _content(1, 300_000), _content(2, 200_000)
    offered = _ahead(path, [x, y])
    assert len(offered) == 1 and offered[0].raw == x + y
    before = os.path.getsize(path)
    locs = _commit(path, [x, y], offered)
    image = Path(path).read_bytes()
    assert offered[0].payload in image  # appended verbatim: not compressed again
    assert len(image) - before < len(offered[0].payload) + 4096
    assert _read_back(path, locs[0]) == x and _read_back(path, locs[1]) == y


def test_chunks_of_a_pack_partly_stored_are_compressed_again_and_nothing_else_lands(
        tmp_path: Path) -> None:
    path = _image(tmp_path)
    x, never = _content(3, 300_000), os.urandom(400_000)  # never: incompressible
    offered = _ahead(path, [x, never])
    before = os.path.getsize(path)
    locs = _commit(path, [x], offered)
    image = Path(path).read_bytes()
    assert all(p.payload not in image for p in offered)
    assert len(image) - before < 200_000  # x compressed; nothing of never's 400 KB
    assert never[1000:1100] not in image
    assert _read_back(path, locs[0]) == x


def test_what_the_image_holds_is_not_compressed_ahead(tmp_path: Path) -> None:
    path = _image(tmp_path)
    x, y = _content(4, 250_000), _content(5, 250_000)
    _commit(path, [x], [])
    offered = _ahead(path, [x, y])
    assert b"".join(p.raw for p in offered) == y
    locs = _commit(path, [x, y], offered)
    assert _read_back(path, locs[0]) == x and _read_back(path, locs[1]) == y


def test_past_the_budget_nothing_more_is_compressed_ahead(tmp_path: Path) -> None:
    path = _image(tmp_path)
    x, y = _content(6, 100_000), _content(7, 100_000)
    assert b"".join(p.raw for p in _ahead(path, [x, y], budget=150_000)) == x
    assert _ahead(path, [], budget=150_000) == []


def test_a_failed_guess_costs_nothing(tmp_path: Path) -> None:
    """Contents that raise midway: the packs sealed before it are kept, nothing escapes."""
    path = _image(tmp_path)

    def contents() -> Iterable[bytes]:
        yield _content(8, 100_000)
        raise OSError("the .deb went away")

    ahead = CompressAhead(path, LEVEL, contents).start()
    assert ahead.packs() == []  # the error came before the first pack was sealed
    ahead.stop()
