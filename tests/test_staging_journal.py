"""A volatile session's journal (staging.JournalStore) reads back exactly what SQLite
would after the same syncs, ignores a record a crash cut short, and refuses one that is
not a record."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from imagefs.errors import CorruptImage
from imagefs.format import layout as F
from imagefs.session.staging import StagedInode, Staging


def _node(ino: int, rng: random.Random) -> StagedInode:
    kind = rng.choice([F.REG, F.DIR, F.LNK])
    return StagedInode(ino, rng.choice([None, ino + 7]), kind, 0o644, rng.randrange(3), 0,
                       rng.randrange(1, 3), rng.randrange(100), 0, rng.randrange(10**9),
                       1, 2, target=b"t" if kind == F.LNK else b"",
                       entries={} if kind == F.DIR else None, dirty=rng.random() < 0.5)


def _state(st: Staging) -> tuple[dict[str, object], dict[int, tuple[object, ...]]]:
    nodes = st.load_nodes()
    return st.load_meta(), {i: (n.kind, n.size, n.mtime_ns, n.base, n.dirty, n.target,
                                sorted(n.entries.items()) if n.entries is not None else None)
                            for i, n in nodes.items()}


@pytest.mark.parametrize("seed", range(5))
def test_the_journal_reads_back_what_sqlite_does(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    stores = [Staging(str(tmp_path / "db"), False), Staging(str(tmp_path / "j"), True)]
    try:
        for _sync in range(20):
            ops = []
            for _op in range(rng.randrange(1, 30)):
                what = rng.random()
                ino = rng.randrange(1, 40)
                if what < 0.4:
                    ops.append(("node", _node(ino, rng)))
                elif what < 0.5:
                    ops.append(("gone", ino))
                elif what < 0.9:
                    child = None if rng.random() < 0.3 else rng.randrange(1, 40)
                    ops.append(("entry", (ino, f"n{rng.randrange(6)}".encode(), child)))
                else:
                    ops.append(("meta", (f"k{rng.randrange(3)}", [rng.randrange(9), "v"])))
            for st in stores:
                for kind, arg in ops:
                    if kind == "node":
                        st.node_changed(arg)  # type: ignore[arg-type]
                    elif kind == "gone":
                        st.node_gone(arg)  # type: ignore[arg-type]
                    elif kind == "entry":
                        st.entry_set(*arg)  # type: ignore[misc]
                    else:
                        st.meta_set(*arg)  # type: ignore[misc]
                st.sync(durable=rng.random() < 0.3)
            if rng.random() < 0.3:  # read between writes: what was read is kept up to date
                now = _state(stores[0])
                now[0].pop("synced", None)
                assert _state(stores[1]) == now
        expected = _state(stores[0])
        expected[0].pop("synced", None)  # a durable sync's mark: never in a journal
        assert _state(stores[1]) == expected
    finally:
        for st in stores:
            st.close()
    reopened = Staging(str(tmp_path / "j"), True)
    try:
        assert _state(reopened) == expected
    finally:
        reopened.close()


def _journal_of_two_syncs(tmp_path: Path) -> Path:
    st = Staging(str(tmp_path / "s"), True)
    try:
        st.meta_set("base_root", 1)
        st.sync()
        st.meta_set("base_root", 2)
        st.sync()
    finally:
        st.close()
    return tmp_path / "s" / "staging.journal"


def test_a_record_cut_short_is_not_part_of_the_session(tmp_path: Path) -> None:
    journal = _journal_of_two_syncs(tmp_path)
    data = journal.read_bytes()
    journal.write_bytes(data[:-3])  # the second record, torn by a crash
    st = Staging(str(tmp_path / "s"), True)
    try:
        assert st.load_meta()["base_root"] == 1
    finally:
        st.close()


@pytest.mark.parametrize("garbage", [b"\x00\x01\x02\x03", b"\xe9\x01\x00\x00\x00",
                                     b"\x29\x00"])
def test_a_record_that_is_not_one_is_refused(tmp_path: Path, garbage: bytes) -> None:
    journal = _journal_of_two_syncs(tmp_path)
    with journal.open("ab") as fh:
        fh.write(len(garbage).to_bytes(4, "little") + garbage)
    st = Staging(str(tmp_path / "s"), True)
    try:
        with pytest.raises(CorruptImage, match="staging journal"):
            st.load_meta()
    finally:
        st.close()
