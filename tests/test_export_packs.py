"""Export moves packs as they are stored (issue 16): a pack the exported indices use whole
is copied byte for byte, only partly used ones are repacked, `--level` recompresses all,
and a damaged or altered pack is reported, never copied."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import zstandard
from conftest import assert_same_tree, run_imagefs
from crafted import frame_bytes
from test_hostile import assert_clear_failure, run_cli

from imagefs.format import layout as F
from imagefs.format.container import ImageFile


def _pack_payloads(image: Path) -> dict[int, bytes]:
    """The stored payload of every pack frame of image, by offset."""
    with ImageFile.open(str(image)) as f:
        end = f.read_commit().data_end
        return {info.offset: os.pread(f.fd, info.stored, info.offset + F.FRAME_HEADER)
                for info in f.iter_frames(end) if info.kind == F.KIND_PACK}


def _digests(payloads: dict[int, bytes]) -> set[bytes]:
    return {hashlib.sha256(p).digest() for p in payloads.values()}


def _tree(root: Path, seed: int, names: list[str]) -> Path:
    """Files of text-like content, ~300 KiB each, so that a tree fills several packs."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnop", k=rnd.randint(2, 9))) for _ in range(4000)]
    root.mkdir(parents=True)
    for name in names:
        body = b" ".join(rnd.choices(words, k=50_000))[:300 << 10]
        (root / name).write_bytes(body)
    return root


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Index 1: files a0..a9; index 2: the same but a4, plus b0..b3 of its own."""
    base = tmp_path_factory.mktemp("export-packs")
    one = _tree(base / "one", 1, [f"a{i}" for i in range(10)])
    second = base / "second"
    shutil.copytree(one, second)
    (second / "a4").unlink()
    _tree(base / "extra", 2, [f"b{i}" for i in range(4)])
    for f in (base / "extra").iterdir():
        shutil.copy2(f, second / f.name)
    image = base / "two.imagefs"
    run_imagefs("capture", one, image, "--name", "one")
    run_imagefs("capture", second, image, "--name", "second")
    return image, one, second


def test_an_index_used_whole_moves_its_packs_untouched(two: tuple[Path, Path, Path],
                                                        tmp_path: Path) -> None:
    image, _one, second = two
    dest = tmp_path / "second.imagefs"
    run_imagefs("export", image, "2", dest)
    run_imagefs("verify", dest)
    source, out = _pack_payloads(image), _pack_payloads(dest)
    same = _digests(out) & _digests(source)
    # second's own packs and every pack of one's it uses whole came across byte for byte;
    # the pack that held a4 (partly used now) was repacked: its bytes are new
    assert len(same) >= 3
    repacked = len(out) - len(same)
    assert 1 <= repacked <= 2
    applied = tmp_path / "applied"
    run_imagefs("apply", dest, "1", applied)
    assert_same_tree(second, applied)
    got, want = (json.loads(run_imagefs("info", img, n, "--json").stdout)
                 for img, n in ((dest, "1"), (image, "2")))
    assert got["indices"][0]["digest"] == want["indices"][0]["digest"]
    # the copied packs count in what the file says it stores
    assert got["stored_bytes"] >= sum(len(p) for p in out.values())


def test_a_level_recompresses_every_chunk(two: tuple[Path, Path, Path],
                                          tmp_path: Path) -> None:
    image, _one, second = two
    dest = tmp_path / "second.imagefs"
    run_imagefs("export", image, "2", dest, "--level", "1")
    assert not _digests(_pack_payloads(dest)) & _digests(_pack_payloads(image))
    applied = tmp_path / "applied"
    run_imagefs("apply", dest, "1", applied)
    assert_same_tree(second, applied)


def test_into_an_existing_image_nothing_is_stored_twice(two: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    image, one, _second = two
    dest = tmp_path / "dest.imagefs"
    run_imagefs("capture", one, dest, "--name", "first")
    before = dest.stat().st_size
    run_imagefs("export", image, "2", dest)
    run_imagefs("verify", dest)
    # only second's own content (b0..b3, ~1.2 MiB of text) is new in dest
    assert dest.stat().st_size - before < (1200 << 10) * 0.6


def _flip_in_a_pack(image: Path) -> None:
    """Alter one byte of a pack's content and recompute its frame's checksums, as a crafter
    would: the frame checks out, the chunk inside does not."""
    payloads = _pack_payloads(image)
    offset, payload = max(payloads.items(), key=lambda kv: len(kv[1]))
    dctx = zstandard.ZstdDecompressor()
    raw = dctx.decompress(payload)
    for at in range(len(payload) // 2, len(payload)):
        altered = bytearray(payload)
        altered[at] ^= 0x01
        try:
            got = dctx.decompress(bytes(altered), max_output_size=len(raw))
        except zstandard.ZstdError:
            continue
        if len(got) == len(raw) and got != raw:
            break
    else:
        pytest.fail("no byte of the pack could be altered into another valid frame")
    frame = frame_bytes(F.KIND_PACK, b"", raw_len=len(raw), payload=bytes(altered))
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, frame, offset)
    finally:
        os.close(fd)


def test_a_damaged_pack_is_reported_never_copied(two: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    image = shutil.copyfile(two[0], tmp_path / "damaged.imagefs")
    payloads = _pack_payloads(image)
    offset = max(payloads, key=lambda o: len(payloads[o]))
    fd = os.open(image, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset + F.FRAME_HEADER + 100)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset + F.FRAME_HEADER + 100)
    finally:
        os.close(fd)
    dest = tmp_path / "out.imagefs"
    line = assert_clear_failure(run_cli("export", image, "all", dest), (4,))
    assert "checksum mismatch" in line
    assert not dest.exists()


def test_content_altered_under_recomputed_checksums_is_refused_with_check(
        two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """--check decompresses each copied pack: the altered chunk is refused."""
    image = shutil.copyfile(two[0], tmp_path / "crafted.imagefs")
    _flip_in_a_pack(image)
    dest = tmp_path / "out.imagefs"
    for argv in (("export", image, "all", dest, "--check"), ("optimize", image, "--check")):
        before = image.read_bytes()
        line = assert_clear_failure(run_cli(*argv), (4,))
        assert "checksum mismatch" in line and "chunk" in line
        assert not dest.exists()
        assert image.read_bytes() == before


def test_content_altered_under_recomputed_checksums_is_passed_on_as_it_is(
        two: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Without --check the pack is copied as stored, as wimexport copies: the copy is no
    worse than the source, and verify finds the fault in both (exit 1)."""
    image = shutil.copyfile(two[0], tmp_path / "crafted.imagefs")
    _flip_in_a_pack(image)
    dest = tmp_path / "out.imagefs"
    assert run_cli("export", image, "all", dest).code == 0
    for f in (image, dest):
        r = run_cli("verify", f)
        assert r.code == 1 and "fail their checksums" in r.stdout.decode(), str(r)
