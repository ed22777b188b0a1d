"""Metadata records read by their head alone (MetaReader.kind_and_digest), as a commit
names the unchanged entries of each directory it rewrites."""

from __future__ import annotations

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
