"""The chunk table answers the same before and after it indexes its entries.

A loaded table answers its first questions by searching the raw entries (packs.ChunkTable),
then indexes them.  Both ways must find the same chunks, also for colliding fast hashes and
for a fast hash whose bytes also occur inside another entry (not at an entry's start).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imagefs.format.commit_record import Commit
from imagefs.format.container import ImageFile
from imagefs.format.packs import ChunkLoc, ChunkTable
from imagefs.format.writer import Transaction

A = b"content A " * 1000
B = b"content B " * 1000
C = b"content C " * 1000
D = b"content D " * 1000
FORCED = hashlib.md5(b"any 16 bytes").digest()


D_XXH = hashlib.md5(b"d").digest()
C_XXH = D_XXH[8:] + hashlib.sha256(D).digest()[:8]  # spans D's xxh and sha


def _stored(tmp_path: Path, with_b: bool = True) -> tuple[str, list[ChunkLoc]]:
    """An image whose table holds A and (with_b) B under one fast hash, D, and C under a
    fast hash that also occurs in D's entry, 8 bytes into it; the chunks' locations."""
    path = str(tmp_path / "image.ifs")
    ImageFile.create(path)
    chunks = [(A, FORCED), *([(B, FORCED)] if with_b else []), (D, D_XXH), (C, C_XXH)]
    with ImageFile.open(path, writable=True) as f, Transaction(f, 1) as tx:
        packs = tx.pack_writer()
        locs = [packs.add_chunk(data, xxh=xxh) for data, xxh in chunks]
        tx.finish_packs()
        tx.publish()
    return path, locs


def _answers(table: ChunkTable, locs: list[ChunkLoc]) -> list[tuple[int, int] | None]:
    out: list[tuple[int, int] | None] = []
    for loc in locs:
        found = table.find(loc.xxh, loc.sha)
        at = table.at(loc.pack_id(), loc.offset, loc.xxh)
        assert found is not None and at is not None
        assert (at.pack, at.offset, at.sha) == (found.pack, found.offset, found.sha)
        out.append((found.pack, found.offset))
    out.append(None if table.find(FORCED, hashlib.sha256(C).digest()) is None else (0, 0))
    return out


def test_searching_and_indexing_find_the_same_chunks(tmp_path: Path) -> None:
    path, locs = _stored(tmp_path)
    want = [(loc.pack_id(), loc.offset) for loc in locs]
    with ImageFile.open(path) as f:
        commit: Commit = f.read_commit()
        table = ChunkTable.load(f, commit)
        assert table.count == commit.chunks == 4
        assert table.unique_bytes == commit.unique_bytes == 4 * len(A)
        searched = _answers(table, locs)
        assert searched[:4] == want
        assert searched[4] is None  # C's content under A's fast hash is not stored
        while table._raw:  # ask until the table indexes its entries
            table.find(FORCED, A)
        assert _answers(table, locs) == searched
        assert [(c.pack, c.offset) for c in table.all()] == want  # the file's order


def test_a_new_chunk_is_found_and_listed_once(tmp_path: Path) -> None:
    path, locs = _stored(tmp_path)
    with ImageFile.open(path, writable=True) as f, Transaction(f, 1) as tx:
        packs = tx.pack_writer()
        e = packs.add_chunk(b"content E " * 1000, xxh=FORCED)
        assert packs.add_chunk(A, xxh=FORCED).offset == locs[0].offset  # stored once
        assert packs.table.find(FORCED, e.sha) is e
        listed = packs.table.all()
        assert sum(c is e for c in listed) == 1 and len(listed) == 5
        assert packs.table.count == 5


def test_without_a_shared_fast_hash_the_index_finds_entries_where_they_lie(
        tmp_path: Path) -> None:
    """No two entries share an xxh3-128 (as in any real image): the index holds where each
    entry lies and unpacks it when asked; a chunk added later with the xxh3-128 of an
    entry there is found beside it, and all() lists every entry once."""
    path, locs = _stored(tmp_path, with_b=False)
    want = [(loc.pack_id(), loc.offset) for loc in locs]
    with ImageFile.open(path, writable=True) as f, Transaction(f, 1) as tx:
        table = tx.pack_writer().table
        while table._raw:
            assert table.find(hashlib.md5(b"nothing").digest(), A) is None
        assert table._where and not table.by_xxh  # indexed by place, no object yet
        found = [table.find(loc.xxh, loc.sha) for loc in locs]
        assert [(c.pack, c.offset) for c in found if c is not None] == want
        assert table.find(FORCED, hashlib.sha256(B).digest()) is None
        b = tx.pack_writer().add_chunk(B, xxh=FORCED)  # A's fast hash, new content
        assert table.find(FORCED, b.sha) is b
        assert (table.find(FORCED, locs[0].sha) or locs[1]).offset == locs[0].offset
        listed = table.all()
        assert len(listed) == 4 and sum(c is b for c in listed) == 1
        assert sorted((c.pack, c.offset) for c in listed if c is not b) == want
