"""Metadata records read by their head alone (MetaReader.kind_and_digest), as a commit
names the unchanged entries of each directory it rewrites."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_imagefs

from imagefs.errors import CorruptImage
from imagefs.format import layout as F
from imagefs.format.records import MetaReader
from imagefs.image import Image


def _refs(view, ref: int) -> list[int]:  # noqa: ANN001 - an IndexView
    out, stack = [], [ref]
    while stack:
        ref = stack.pop()
        out.append(ref)
        ino = view.get(ref)
        stack.extend(child for _name, _kind, child in ino.entries)
    return out


def test_the_head_says_what_the_whole_record_says(every_type_tree: Path,
                                                  tmp_path: Path) -> None:
    image = tmp_path / "t.imagefs"
    run_imagefs("capture", every_type_tree, image, "--name", "t")
    with Image.open(str(image)) as img:
        view = img.view(1)
        refs = _refs(view, view.entry.root)
        kinds = set()
        for ref in refs:
            whole = view.get(ref)
            assert view.kind_and_digest(ref) == (whole.kind, whole.digest)
            kinds.add(whole.kind)
    assert {F.REG, F.DIR, F.LNK} <= kinds and len(refs) > 10


class _Block(MetaReader):
    """A reader over one crafted block: a record whose head is cut, or of no kind."""

    def __init__(self, record: bytes) -> None:
        self.image = type("I", (), {"path": "crafted"})()
        self.raw = record

    def block(self, offset: int) -> tuple[bytes, list[int]]:
        return self.raw, [0, len(self.raw)]


@pytest.mark.parametrize("record", [bytes(F.INODE.size - 1), b"\xee" + bytes(F.INODE.size)],
                         ids=["cut-short", "unknown-kind"])
def test_a_crafted_head_is_corrupt_not_a_digest(record: bytes) -> None:
    with pytest.raises(CorruptImage):
        _Block(record).kind_and_digest(0)


def _directory(entries: list[tuple[bytes, int, int]], size: int | None = None) -> bytes:
    """A directory record holding entries exactly as given (encode() does not check)."""
    from imagefs.format.records import Inode

    return Inode(F.DIR, 0o40755, 0, 0, 2, len(entries) if size is None else size, 0, 0, 0,
                 0, entries=entries).encode()


@pytest.mark.parametrize(("entries", "problem"), [
    ([(b"a", F.REG, 1), (b"a/b", F.REG, 2)], "bad name in directory: b'a/b'"),
    ([(b"a\0", F.REG, 1)], "bad name in directory: b'a\\x00'"),
    ([(b"", F.REG, 1), (b"abc", F.REG, 2)], "bad name in directory: b''"),
    ([(b".", F.DIR, 1)], "bad name in directory: b'.'"),
    ([(b"..", F.DIR, 1)], "bad name in directory: b'..'"),
    ([(b"b", F.REG, 1), (b"a", F.REG, 2)], "directory entries unsorted or repeated: b'a'"),
    ([(b"a", F.REG, 1), (b"a", F.REG, 2)], "directory entries unsorted or repeated: b'a'"),
    ([(b"a", F.REG, 1), (b"b", 99, 2)], "unknown entry kind 99"),
])
def test_each_bad_entry_is_named(entries: list[tuple[bytes, int, int]], problem: str) -> None:
    """records._decode_entries checks every entry in one scan; what it rejects is named as
    the one-by-one check names it, and a good record decodes to the entries it holds."""
    from imagefs.format.records import decode_inode

    with pytest.raises(CorruptImage, match=re.escape(problem)):
        decode_inode(_directory(entries), "r")
    good = [(b"a", F.REG, 1), (b"b.c", F.DIR, 2), (b"\xff", F.LNK, 3)]
    assert decode_inode(_directory(good), "r").entries == good


def test_a_directory_cut_short_or_miscounted_is_corrupt() -> None:
    from imagefs.format.records import decode_inode

    whole = _directory([(b"a", F.REG, 1), (b"bb", F.REG, 2)])
    with pytest.raises(CorruptImage, match="run past the record|larger than the record"):
        decode_inode(whole[:-3], "r")
    with pytest.raises(CorruptImage, match="size does not match its entry count"):
        decode_inode(_directory([(b"a", F.REG, 1)], size=2), "r")
