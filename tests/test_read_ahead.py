"""A mount's PackReader reads ahead (issue 17): packs asked for one after another in file
order have the next one decompressed on a worker thread; packs asked for out of order do
not; a damaged pack read ahead is reported to the reader that asks for it, not lost."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from conftest import run_imagefs

from imagefs.errors import ChecksumMismatch
from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.packs import ChunkTable, PackReader


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten packs or so of incompressible content."""
    base = tmp_path_factory.mktemp("read-ahead")
    tree = base / "tree"
    tree.mkdir()
    rng = random.Random(3)
    for i in range(10):
        (tree / f"f{i}").write_bytes(rng.randbytes(1 << 20))
    img = base / "image.imagefs"
    run_imagefs("capture", tree, img, "--name", "t", "--level", "1")
    return img


def _packs(f: ImageFile) -> list[int]:
    return sorted({loc.pack_id() for loc in ChunkTable.load(f, f.read_commit()).all()})


def _settle(reader: PackReader) -> None:
    if reader._ahead is not None:
        reader._ahead.shutdown(wait=True)
        reader._ahead = None


def test_packs_in_file_order_are_read_ahead(image: Path) -> None:
    with ImageFile.open(str(image)) as f:
        packs = _packs(f)
        assert len(packs) >= 5
        reader = PackReader(f, 64 << 20, read_ahead=True)
        reader.pack(packs[0])
        reader.pack(packs[1])  # two in a row: the third is read ahead
        _settle(reader)
        assert packs[2] in reader._cache and reader.decompressions == 3
        reader.pack(packs[2])  # asked for: the fourth follows
        _settle(reader)
        assert packs[3] in reader._cache and reader.decompressions == 4


def test_packs_out_of_order_are_not(image: Path) -> None:
    with ImageFile.open(str(image)) as f:
        packs = _packs(f)
        reader = PackReader(f, 64 << 20, read_ahead=True)
        for p in (packs[4], packs[0], packs[2]):
            reader.pack(p)
        _settle(reader)
        assert reader.decompressions == 3
        plain = PackReader(f, 64 << 20)  # without read_ahead: never
        for p in packs[:4]:
            plain.pack(p)
        assert plain.decompressions == 4 and plain._ahead is None


def test_a_damaged_pack_read_ahead_fails_its_reader(image: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.imagefs"
    damaged.write_bytes(image.read_bytes())
    with ImageFile.open(str(damaged)) as f:
        third = _packs(f)[2]
    fd = os.open(damaged, os.O_RDWR)
    try:
        at = third + F.FRAME_HEADER + 10
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
    finally:
        os.close(fd)
    with ImageFile.open(str(damaged)) as f:
        packs = _packs(f)
        reader = PackReader(f, 64 << 20, read_ahead=True)
        reader.pack(packs[0])
        reader.pack(packs[1])
        _settle(reader)  # the read ahead of the third met the damage, quietly
        assert packs[2] not in reader._cache
        with pytest.raises(ChecksumMismatch):
            reader.pack(packs[2])
