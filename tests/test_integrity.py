"""Damage anywhere in an image file is found, and never turns into wrong bytes.

Requirement 5 and 10 of the design: every stored byte is covered by a checksum, `verify`
finds any single damaged byte (a clear error for header damage, a report naming what
and which indices/paths otherwise), and reading a file whose pack is damaged is a clear
one-line error while files in other packs still read back exactly.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import cli_zygote
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagefs.errors import Error
from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.image import Image
from imagefs.verify import verify

INTERNAL_ERROR = 70


def run_cli(*args: object, timeout: float = 30, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
    """`python -m imagefs.cli ARGS`; never a traceback, never an internal error."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_TEST_")}
    full_env.update(env or {})
    p = cli_zygote.run([str(a) for a in args], timeout=timeout, env=full_env)
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    assert p.returncode != INTERNAL_ERROR, p.stderr.decode(errors="replace")
    return p


def one_error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    lines = p.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: "), lines
    return lines[0]


def _write_tree(root: Path, rng: random.Random, variant: int) -> None:
    for d in range(4):
        sub = root / f"d{d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(6):
            (sub / f"small{i}.txt").write_bytes(
                f"variant {variant if i == 0 else 0} dir {d} file {i}\n".encode() * (i + 1))
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("d0/small1.txt")
    (root / "d1" / "medium.bin").write_bytes(rng.randbytes(200_000))
    for i in range(3):
        (root / f"big{i}.bin").write_bytes(rng.randbytes(1_300_000 + i * 1000))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real image: index 1, then index 2 sharing most of it; several packs."""
    base = tmp_path_factory.mktemp("integrity")
    rng = random.Random(5)
    one, two = base / "one", base / "two"
    _write_tree(one, rng, 1)
    shutil.copytree(one, two, symlinks=True)
    (two / "d0" / "small0.txt").write_bytes(b"changed in two\n")
    (two / "big1.bin").write_bytes(rng.randbytes(1_100_000))
    (two / "new.bin").write_bytes(rng.randbytes(300_000))
    img = base / "image.ifs"
    for name, src in (("one", one), ("two", two)):
        p = run_cli("capture", src, img, "--name", name, "--level", "3")
        assert p.returncode == 0, p.stderr
    report = verify(str(img))
    assert report.ok, report.problems
    with ImageFile.open(str(img)) as f:
        packs = [i for i in f.iter_frames(f.read_commit().data_end) if i.kind == F.KIND_PACK]
    assert len(packs) >= 4, "the test image should have several packs"
    return img


def _frames(path: Path) -> list:
    with ImageFile.open(str(path)) as f:
        return list(f.iter_frames(f.read_commit().data_end))


def _flip(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))


def _verify_finds_damage(path: Path, where: str) -> None:
    try:
        report = verify(str(path))
    except Error:
        return  # damage that makes the file unreadable as a whole: a clear error
    assert not report.ok, f"verify reports a clean file after damage at {where}"


# ---- any byte, any flip -----------------------------------------------------------------


@pytest.fixture(scope="module")
def regions(image: Path) -> list[tuple[int, int]]:
    """Byte ranges worth aiming at besides "anywhere": header, slots, every frame header,
    and every non-pack frame (metadata, chunk table, commits) in full."""
    out = [(0, F.HEADER_USED), (F.SLOT_OFFSETS[0], F.SLOT_OFFSETS[0] + F.SLOT_SIZE),
           (F.SLOT_OFFSETS[1], F.SLOT_OFFSETS[1] + F.SLOT_SIZE), (0, F.HEADER_SIZE)]
    for info in _frames(image):
        out.append((info.offset, info.offset + F.FRAME_HEADER))
        if info.kind != F.KIND_PACK:
            out.append((info.offset, info.end))
    out.append((0, image.stat().st_size))
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mask=st.integers(1, 255))
def test_any_flipped_byte_is_found(image: Path, regions: list[tuple[int, int]],
                                   tmp_path_factory: pytest.TempPathFactory,
                                   data: st.DataObject, mask: int) -> None:
    a, b = data.draw(st.sampled_from(regions), label="region")
    offset = data.draw(st.integers(a, b - 1), label="offset")
    work = tmp_path_factory.getbasetemp() / "integrity-flip.ifs"
    shutil.copyfile(image, work)  # a fresh copy for every example
    _flip(work, offset, mask)
    _verify_finds_damage(work, f"offset {offset} (xor {mask:#x})")


def test_every_frame_header_and_payload_end(image: Path, tmp_path: Path) -> None:
    """Deterministic sweep: one byte of every frame's header, and its last payload byte."""
    work = tmp_path / "work.ifs"
    frames = _frames(image)
    targets = []
    for info in frames:
        targets += [info.offset + 3, info.offset + 20, info.offset + 39, info.end - 1]
    for off in targets:
        shutil.copyfile(image, work)
        _flip(work, off, 0x10)
        _verify_finds_damage(work, f"offset {off}")


def test_newest_commit_damaged_is_not_silently_rolled_back(image: Path, tmp_path: Path
                                                           ) -> None:
    """Damage in the newest commit record must not make the image look clean with only
    the older state (index 2 silently gone): verify fails, readers fail."""
    work = tmp_path / "work.ifs"
    shutil.copyfile(image, work)
    last = _frames(image)[-1]
    assert last.kind == F.KIND_COMMIT
    _flip(work, last.offset + F.FRAME_HEADER + 5, 0x01)
    _verify_finds_damage(work, "the newest commit")
    p = run_cli("info", work, "--json")
    assert p.returncode != 0, "info shows an older state of a damaged image as if current"
    one_error_line(p)


def test_truncated_by_one_byte_is_an_error(image: Path, tmp_path: Path) -> None:
    work = tmp_path / "work.ifs"
    shutil.copyfile(image, work)
    os.truncate(work, image.stat().st_size - 1)
    _verify_finds_damage(work, "the end (file truncated by one byte)")
    p = run_cli("ls", work, "1")
    assert p.returncode != 0
    one_error_line(p)


# ---- the CLI names what is broken -------------------------------------------------------


def _locate(image: Path, index: int, path: str) -> set[int]:
    """The packs holding the chunks of a file."""
    with Image.open(str(image)) as img:
        view = img.view(index)
        return {e[1] for e in view.lookup(path).extents}


def _files(image: Path, index: int) -> dict[str, set[int]]:
    with Image.open(str(image)) as img:
        view = img.view(index)
        return {p.decode(): {e[1] for e in ino.extents}
                for p, ino in view.walk() if ino.kind == F.REG and ino.extents}


def test_damaged_pack_other_files_still_read(image: Path, tmp_path: Path) -> None:
    work = tmp_path / "work.ifs"
    shutil.copyfile(image, work)
    files = _files(image, 1)
    victim_packs = _locate(image, 1, "/big0.bin")
    pack = min(victim_packs)
    info = next(i for i in _frames(image) if i.offset == pack)
    _flip(work, pack + F.FRAME_HEADER + info.stored // 2, 0x40)
    safe = [p for p, packs in files.items() if pack not in packs]
    broken = sorted(p for p, packs in files.items() if pack in packs)
    assert safe and "/big0.bin" in broken
    src = image.parent / "one"
    # A sample keeps this fast: the biggest safe files, a small one, a symlinked one.
    safe = sorted(safe, key=lambda p: (src / p.lstrip("/")).stat().st_size)[-3:] + safe[:2]
    for path in safe:
        p = run_cli("cat", work, "1", path)
        assert p.returncode == 0, p.stderr
        assert p.stdout == (src / path.lstrip("/")).read_bytes(), path
    for path in broken[:4]:
        p = run_cli("cat", work, "1", path)
        assert p.returncode != 0, f"cat of {path} in a damaged pack succeeded"
        line = one_error_line(p)
        assert "checksum" in line or "damaged" in line, line
        assert str(pack) in line, f"the error should say where: {line}"
        # Never wrong bytes: nothing of a damaged chunk reaches stdout.
        original = (src / path.lstrip("/")).read_bytes()
        assert original.startswith(p.stdout)
    p = run_cli("verify", work)
    assert p.returncode == 1, (p.stdout, p.stderr)
    out = p.stdout.decode()
    assert "BROKEN:" in out
    assert f"pack at offset {pack}" in out, out
    for path in broken:
        assert f"affects path: {path}" in out, out
    # The damaged pack is shared by both indices: both are named.
    assert "affects indices: 1" in out and "affects indices: 2" in out, out
    one_error_line(p)


@pytest.mark.parametrize("what", ["metadata", "table", "slot-current", "slot-old",
                                  "header-padding", "old-commit"])
def test_verify_names_the_broken_part(image: Path, tmp_path: Path, what: str) -> None:
    work = tmp_path / "work.ifs"
    shutil.copyfile(image, work)
    frames = _frames(image)
    commits = [i for i in frames if i.kind == F.KIND_COMMIT]
    with ImageFile.open(str(image)) as f:
        slots = f.read_slots()
    current = max(range(2), key=lambda i: slots[i][0])  # type: ignore[index]
    expect: list[str]
    if what == "metadata":
        info = next(i for i in frames if i.kind == F.KIND_META)
        _flip(work, info.offset + F.FRAME_HEADER + 1, 0x08)
        expect = [f"metadata block at offset {info.offset}"]
    elif what == "table":
        info = next(i for i in frames if i.kind == F.KIND_TABLE)
        _flip(work, info.offset + F.FRAME_HEADER + 1, 0x08)
        expect = [f"chunk table at offset {info.offset}"]
    elif what == "slot-current":
        _flip(work, F.SLOT_OFFSETS[current] + 9, 0x01)
        expect = [f"root slot {'AB'[current]}"]
    elif what == "slot-old":
        _flip(work, F.SLOT_OFFSETS[1 - current] + 9, 0x01)
        expect = [f"root slot {'AB'[1 - current]}"]
    elif what == "header-padding":
        _flip(work, 2000, 0x01)
        expect = ["header bytes"]
    else:
        _flip(work, commits[0].offset + F.FRAME_HEADER + 2, 0x01)
        expect = [f"commit record at offset {commits[0].offset}"]
    p = run_cli("verify", work)
    assert p.returncode != 0, f"verify passed with damaged {what}"
    text = p.stdout.decode() + p.stderr.decode()
    if p.returncode == 1:
        assert "BROKEN:" in p.stdout.decode()
    for word in expect:
        assert word in text, (what, text)
    one_error_line(p)


def test_verify_header_damage_is_a_clear_error(image: Path, tmp_path: Path) -> None:
    work = tmp_path / "work.ifs"
    shutil.copyfile(image, work)
    _flip(work, 33, 0x01)  # chunk min size: covered by the header checksum
    p = run_cli("verify", work)
    assert p.returncode == 4
    assert "header" in one_error_line(p)
    p = run_cli("verify", work, "--json")
    assert p.returncode == 4
    one_error_line(p)


def test_verify_clean_json(image: Path) -> None:
    p = run_cli("verify", image, "--json")
    assert p.returncode == 0, p.stdout
    assert b'"ok": true' in p.stdout
