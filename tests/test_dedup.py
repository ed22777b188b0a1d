"""Deduplication: content is stored once across indices, at chunk granularity.

- The second Debian variant (bookworm-web after bookworm-minbase) costs a fraction of
  capturing it alone.
- A one-byte change in a 64 MiB file costs at most two chunks; an insertion (which shifts
  every later byte) costs a few chunks too, thanks to content-defined chunking.
- Capturing the same tree again stores nothing new and yields the same digest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import fixture_tree, run_imagefs

import imagefs
from imagefs.format import layout as F

MiB = 1 << 20
LEVEL = 3  # the dedup numbers do not depend on the level; the run time does


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def test_second_debian_variant_costs_little(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    minbase, web = fixture_tree("bookworm-minbase"), fixture_tree("bookworm-web")
    both = tmp_path / "both.imagefs"
    r1 = imagefs.capture(str(both), str(minbase), "bookworm-minbase", level=LEVEL)
    size1 = both.stat().st_size
    r2 = imagefs.capture(str(both), str(web), "bookworm-web", level=LEVEL)
    size2 = both.stat().st_size
    alone = tmp_path / "web-alone.imagefs"
    ra = imagefs.capture(str(alone), str(web), "bookworm-web", level=LEVEL)
    size_alone = alone.stat().st_size

    added = size2 - size1
    with capsys.disabled():
        print(f"\n[dedup] minbase alone: {_mib(size1)} on disk ({_mib(r1.new_bytes)} unique); "
              f"web appended: +{_mib(added)} on disk (+{_mib(r2.new_bytes)} new content); "
              f"web alone: {_mib(size_alone)} on disk ({_mib(ra.new_bytes)} unique); "
              f"second index costs {100 * added / size_alone:.1f}% of capturing it alone "
              f"({100 * r2.new_bytes / ra.new_bytes:.1f}% of its content)")
    assert (r1.index, r2.index, ra.index) == (1, 2, 1)
    assert r2.files == ra.files and r2.bytes == ra.bytes
    assert added < 0.35 * size_alone
    assert r2.new_bytes < 0.35 * ra.new_bytes
    # Same tree, same digest, whichever file it went into.
    info_both = json.loads(run_imagefs("info", both, "--json").stdout)
    info_alone = json.loads(run_imagefs("info", alone, "--json").stdout)
    assert info_both["indices"][1]["digest"] == info_alone["indices"][0]["digest"]
    assert info_both["indices"][1]["name"] == "bookworm-web"
    # The file's own accounting agrees with what the captures reported.
    assert info_both["unique_bytes"] == r1.new_bytes + r2.new_bytes
    assert info_both["stored_bytes"] == r1.stored_bytes + r2.stored_bytes
    assert info_both["dedup_ratio"] > 1.5
    assert info_both["size_on_disk"] == size2


def _random_tree(root: Path, data: bytes) -> Path:
    root.mkdir()
    (root / "big.bin").write_bytes(data)
    os.utime(root / "big.bin", ns=(0, 1_700_000_000_000_000_000))
    return root


def test_changed_byte_costs_at_most_two_chunks(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = random.Random(64).randbytes(64 * MiB)
    image = tmp_path / "big.imagefs"
    r1 = imagefs.capture(str(image), str(_random_tree(tmp_path / "v1", data)), "v1",
                         level=1)
    assert r1.new_bytes == len(data)
    size1 = image.stat().st_size

    changed = bytearray(data)
    changed[32 * MiB + 12345] ^= 0xFF
    r2 = imagefs.capture(str(image), str(_random_tree(tmp_path / "v2", bytes(changed))),
                         "v2", level=1)
    size2 = image.stat().st_size

    inserted = data[:20 * MiB] + b"inserted bytes shift everything after them" + data[20 * MiB:]
    r3 = imagefs.capture(str(image), str(_random_tree(tmp_path / "v3", inserted)), "v3",
                         level=1)
    size3 = image.stat().st_size
    with capsys.disabled():
        print(f"\n[dedup] 64 MiB random file; one byte changed: +{r2.new_bytes} bytes of new "
              f"content, file +{size2 - size1} bytes; 42 bytes inserted: "
              f"+{r3.new_bytes} new content, file +{size3 - size2} bytes "
              f"(CHUNK_MAX {F.CHUNK_MAX})")
    assert 0 < r2.new_bytes <= 2 * F.CHUNK_MAX
    assert size2 - size1 <= 2 * F.CHUNK_MAX + 64 * 1024
    assert 0 < r3.new_bytes <= 3 * F.CHUNK_MAX
    assert size3 - size2 <= 3 * F.CHUNK_MAX + 64 * 1024

    # And the indices read back their own versions.
    with imagefs.Image.open(str(image)) as img:
        for spec, expect in (("v1", data), ("v2", bytes(changed)), ("v3", inserted)):
            view = img.view(spec)
            ino = view.lookup("/big.bin")
            assert ino.size == len(expect)
            for off in (0, 20 * MiB - 7, 32 * MiB + 12000, len(expect) - 1000):
                assert view.read(ino, off, 1000) == expect[off:off + 1000], (spec, off)


def test_recapture_stores_nothing_and_keeps_the_digest(every_type_tree: Path,
                                                       tmp_path: Path) -> None:
    image = tmp_path / "twice.imagefs"
    r1 = imagefs.capture(str(image), str(every_type_tree), "first", level=LEVEL)
    size1 = image.stat().st_size
    r2 = imagefs.capture(str(image), str(every_type_tree), "second", level=LEVEL)
    assert r1.new_bytes > 0
    assert r2.new_bytes == 0 and r2.stored_bytes == 0
    assert (r2.files, r2.bytes) == (r1.files, r1.bytes)
    # Only metadata and a commit were added.
    assert image.stat().st_size - size1 < 64 * 1024
    with imagefs.Image.open(str(image)) as img:
        first, second = img.indices
        assert first.digest == second.digest
    # A copy of the tree elsewhere (same content, same metadata) has the same digest too.
    copy = tmp_path / "copy"
    shutil.copytree(every_type_tree / "files", copy / "files", symlinks=True)
    os.utime(copy, ns=(0, 1))
    r3 = imagefs.capture(str(image), str(copy), "files-only", level=LEVEL)
    assert r3.new_bytes == 0


def test_identical_files_in_one_capture_are_stored_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = random.Random(5).randbytes(3 * MiB)
    for i in range(10):
        (src / f"copy-{i}").write_bytes(blob)
    r = imagefs.capture(str(tmp_path / "same.imagefs"), str(src), "same", level=1)
    assert r.bytes == 10 * len(blob)
    assert r.new_bytes == len(blob)
    assert (tmp_path / "same.imagefs").stat().st_size < len(blob) + 256 * 1024


def test_dedup_survives_many_appends(tmp_path: Path) -> None:
    """Each capture appends a chunk-table segment; past writer.MAX_TABLE_SEGMENTS they are
    merged into one.  Content from every earlier capture must still be found."""
    from imagefs.format.writer import MAX_TABLE_SEGMENTS

    image = tmp_path / "many.imagefs"
    rng = random.Random(7)
    blobs = []
    for i in range(MAX_TABLE_SEGMENTS + 3):
        src = tmp_path / f"src{i}"
        src.mkdir()
        blob = rng.randbytes(40_000 + i)
        blobs.append(blob)
        (src / "data").write_bytes(blob)
        r = imagefs.capture(str(image), str(src), f"v{i}", level=1)
        assert r.new_bytes == len(blob)
    with imagefs.Image.open(str(image)) as img:
        assert len(img.commit.tables) <= MAX_TABLE_SEGMENTS
        assert img.commit.chunks >= len(blobs)
    # All earlier content, in one new tree: nothing new to store.
    src = tmp_path / "all"
    src.mkdir()
    for i, blob in enumerate(blobs):
        (src / f"d{i}").write_bytes(blob)
    r = imagefs.capture(str(image), str(src), "all-again", level=1)
    assert r.new_bytes == 0
    doc = json.loads(run_imagefs("verify", image, "--json").stdout)
    assert doc["ok"], doc["problems"]
