"""A staged inode goes into its SQLite row (or a volatile staging's journal record) and
comes back field for field: the writer gives the columns in INODE_COLUMNS order, the
reader takes them by name, so a column added in one place and not the other fails here,
not in a session."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from imagefs.format import layout as F
from imagefs.session.ranges import Ranges
from imagefs.session.staging import INODE_COLUMNS, StagedInode, Staging


def distinct_inode(ino: int, kind: int, **extra: object) -> StagedInode:
    """Every field set, and no two numbers alike, so a swapped column shows."""
    return StagedInode(ino=ino, base=ino + 1000, kind=kind, mode=stat.S_IFREG | 0o640,
                       uid=11, gid=12, nlink=13, size=14, rdev=15, mtime_ns=16,
                       atime_ns=17, ctime_ns=18, xattrs=[(b"user.a", b"b")],
                       base_limit=19, parent=20, dirty=False, committed=21, **extra)


@pytest.mark.parametrize("volatile", [False, True])
def test_every_field_survives_a_sync_and_a_load(tmp_path: Path, volatile: bool) -> None:
    nodes = [
        distinct_inode(5, F.REG, staged=Ranges([(0, 4), (8, 14)])),
        distinct_inode(6, F.REG, inline=bytearray(b"x" * 14)),
        distinct_inode(7, F.LNK, target=b"/etc/hostname"),
        distinct_inode(8, F.DIR, entries={}),
    ]
    st = Staging(str(tmp_path / "s"), volatile)
    try:
        for n in nodes:
            st.node_changed(n)
        st.sync(durable=True)
    finally:
        st.close()
    st = Staging(str(tmp_path / "s"), volatile)
    try:
        loaded = st.load_nodes()
    finally:
        st.close()
    for n in nodes:
        back = loaded[n.ino]
        for f in dataclasses.fields(StagedInode):
            a, b = getattr(n, f.name), getattr(back, f.name)
            if isinstance(a, Ranges):
                a, b = list(a), list(b)
            assert a == b, f"{f.name}: {a!r} came back as {b!r}"
    assert len(INODE_COLUMNS) == 21
