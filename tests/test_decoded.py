"""Decompressed packs kept between servicing transactions (imagefs/format/decoded.py): a
second reader, in a copy of the image too, decompresses nothing, and a reader of the same
file finds them by place without reading the stored frames; a kept file that is damaged
is dropped and read again from the image; the folder stays within its bound; a
transaction keeps what its plan and its mount decompressed."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import run_imagefs
from servicing_helpers import HELLO, NEEDS_DEBS

from imagefs.format.decoded import PLACES, DecodedPacks
from imagefs.format.packs import PackReader
from imagefs.image import Image
from imagefs.places import run_dir


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image whose files span several packs (1 MiB each)."""
    base = tmp_path_factory.mktemp("decoded")
    tree = base / "tree"
    tree.mkdir()
    rng = random.Random(7)
    for i in range(40):  # 4 MiB, half of it compressible
        (tree / f"f{i:02d}").write_bytes(rng.randbytes(50_000) + bytes(50_000))
    run_imagefs("capture", tree, base / "a.imagefs", "--name", "t")
    return base / "a.imagefs"


def read_all(path: Path, decoded: DecodedPacks | None, stored: list[int] | None = None
             ) -> tuple[dict[str, bytes], int]:
    """Every file's bytes through a fresh PackReader; and how many packs it decompressed.
    stored: gets the offset of each frame read as stored (to be named by its bytes)."""
    with Image.open(str(path)) as img:
        if stored is not None:
            real = img.file.read_stored

            def counted(offset: int, kind: bytes) -> Any:
                stored.append(offset)
                return real(offset, kind)

            img.file.read_stored = counted  # type: ignore[method-assign]
        packs = PackReader(img.file, decoded=decoded)
        view = img.view(1, packs)
        root = view.root()
        out = {name.decode(): bytes(view.read(view.get(ref), 0, 1 << 30))
               for name, _kind, ref in root.entries}
        return out, packs.decompressions


def test_a_second_reader_decompresses_nothing_even_in_a_copy(image: Path,
                                                            tmp_path: Path) -> None:
    kept = DecodedPacks(str(tmp_path / "kept"))
    first, n = read_all(image, kept)
    assert n >= 3 and len(os.listdir(tmp_path / "kept" / "packs")) == n
    again, m = read_all(image, kept)
    assert (again, m) == (first, 0)
    copy = tmp_path / "copy.imagefs"
    shutil.copyfile(image, copy)
    assert read_all(copy, kept) == (first, 0)  # named by the stored bytes, not the file
    assert read_all(image, None) == (first, n)  # and what it read is what the image holds


def test_a_reader_of_the_same_file_finds_them_by_place(image: Path, tmp_path: Path) -> None:
    kept = DecodedPacks(str(tmp_path / "kept"))
    first, n = read_all(image, kept)
    places = tmp_path / "kept" / PLACES
    assert len(os.listdir(places)) == n  # one place per pack of this file
    stored: list[int] = []
    assert read_all(image, kept, stored) == (first, 0)
    assert stored == []  # no frame read to be hashed: each found by where it lies
    copy = tmp_path / "copy.imagefs"
    shutil.copyfile(image, copy)
    assert read_all(copy, kept, stored) == (first, 0)
    assert len(stored) == n  # another file: found by the stored bytes, then by place
    assert len(os.listdir(places)) == 2 * n
    for pack in os.listdir(tmp_path / "kept" / "packs"):  # evicted: its places go too
        os.unlink(tmp_path / "kept" / "packs" / pack)
    kept.evict()
    assert os.listdir(places) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "garbage"])
def test_a_damaged_kept_pack_is_not_used(image: Path, tmp_path: Path, damage: str) -> None:
    kept = DecodedPacks(str(tmp_path / "kept"))
    first, n = read_all(image, kept)
    victim = sorted((tmp_path / "kept" / "packs").iterdir())[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[-1:]
    elif damage == "extend":  # the bytes whole, then more
        data += b"\0"
    else:
        data = bytearray(os.urandom(len(data)))
    victim.write_bytes(bytes(data))
    assert read_all(image, kept) == (first, 1)  # that one decompressed again, and right
    assert read_all(image, kept) == (first, 0)  # and kept again, whole


def test_the_folder_stays_within_its_bound(image: Path, tmp_path: Path) -> None:
    kept = DecodedPacks(str(tmp_path / "kept"), limit=1 << 20)
    kept.put("a" * 64, bytes(700_000))
    kept.put("b" * 64, bytes(700_000))
    kept.evict()
    sizes = [p.stat().st_size for p in (tmp_path / "kept" / "packs").iterdir()]
    assert sum(sizes) <= 1 << 20 and len(sizes) == 1
    assert kept.load("b" * 64, 700_000 - 1) is None  # not the size asked for
    assert DecodedPacks(str(tmp_path / "small"), limit=1 << 40).limit < 1 << 40  # free/4


@NEEDS_DEBS
def test_a_transaction_keeps_what_it_decompressed(minbase_image: Path,
                                                  tmp_path: Path) -> None:
    folder = Path(run_dir()) / "decoded" / "packs"
    shutil.rmtree(folder.parent, ignore_errors=True)
    image = tmp_path / "svc.imagefs"
    shutil.copyfile(minbase_image, image)
    run_imagefs("package", "add", image, "1", HELLO, "--no-daemon")
    kept = len(os.listdir(folder))
    assert kept >= 10, kept  # dpkg's own packs, the database's, the libraries'
    assert "OK" in run_imagefs("verify", image).stdout.decode()


def test_a_folder_others_may_write_is_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "kept"
    (folder / "packs").mkdir(parents=True)
    os.chmod(folder / "packs", 0o777)
    with pytest.raises(PermissionError):
        DecodedPacks(str(folder))
    os.chmod(folder / "packs", 0o700)
    os.symlink(folder, tmp_path / "link")
    with pytest.raises(PermissionError):
        DecodedPacks(str(tmp_path / "link"))
    assert DecodedPacks(str(folder)).folder == str(folder)
