"""Lazy metadata (DESIGN.md requirement 7): `info`, `ls` and `cat` on an index of 500 000
files read only what they need.

What is asserted cannot fail by the machine being slow: the number of metadata blocks and
packs each command decodes (counted in-process, by wrapping ImageFile.read_frame_info) and the
peak RSS of the command run as a process.  Wall times are printed, not asserted.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MANY_DIRS, MANY_FILES_PER_DIR
from treegen import many_files_content

import imagefs
from imagefs.cli import main as cli_main
from imagefs.format import layout as F
from imagefs.format.container import ImageFile

RSS_LIMIT_KB = 150 * 1024
TIME_BIN = shutil.which("time", path="/usr/bin")


@pytest.fixture(scope="module")
def many(many_files_image: Path) -> Path:
    return many_files_image


@pytest.fixture(scope="module")
def meta_blocks_total(many: Path) -> int:
    with imagefs.Image.open(str(many)) as img:
        return sum(1 for f in img.file.iter_frames(img.commit.data_end)
                   if f.kind == F.KIND_META)


@contextlib.contextmanager
def count_frames() -> Iterator[collections.Counter]:
    """Count the frames read and decoded, by kind (b"M" metadata, b"P" pack, b"T" chunk
    table, b"C" commit), while the block runs."""
    counts: collections.Counter = collections.Counter()
    orig = ImageFile.read_frame_info  # read_frame's too

    def counting(self: ImageFile, offset: int, kind: bytes | None = None) -> Any:
        counts[kind] += 1
        return orig(self, offset, kind)

    ImageFile.read_frame_info = counting  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        ImageFile.read_frame_info = orig  # type: ignore[method-assign]


def cli_in_process(*args: str) -> tuple[int, bytes, collections.Counter]:
    """Run the CLI's main() here, capturing stdout and counting frames read."""
    buf = io.BytesIO()
    out = io.TextIOWrapper(buf, encoding="utf-8", write_through=True)
    with count_frames() as counts, contextlib.redirect_stdout(out):
        code = cli_main(list(args))
        out.flush()
    return code, buf.getvalue(), counts


def cli_measured(*args: str) -> tuple[subprocess.CompletedProcess[bytes], float, int]:
    """Run the CLI as a process; (result, wall seconds, peak RSS in KiB)."""
    argv = [sys.executable, "-m", "imagefs.cli", *args]
    with tempfile.NamedTemporaryFile("r") as tf:
        if TIME_BIN:
            t0 = time.monotonic()
            proc = subprocess.run([TIME_BIN, "-o", tf.name, "-f", "%e %M", *argv],
                                  capture_output=True)
            wall = time.monotonic() - t0
            fields = tf.read().split()
            wall, rss = float(fields[-2]), int(fields[-1])
        else:  # wait4 gives the child's own rusage
            with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
                t0 = time.monotonic()
                p = subprocess.Popen(argv, stdout=so, stderr=se)
                _pid, status, usage = os.wait4(p.pid, 0)
                wall = time.monotonic() - t0
                p.returncode = os.waitstatus_to_exitcode(status)
                so.seek(0)
                se.seek(0)
                proc = subprocess.CompletedProcess(argv, p.returncode, so.read(), se.read())
                rss = usage.ru_maxrss
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc, wall, rss


def report(capsys: pytest.CaptureFixture[str], what: str, wall: float, rss_kb: int,
           counts: collections.Counter | None = None, total: int | None = None) -> None:
    blocks = "" if counts is None else (
        f"; in-process: {counts[F.KIND_META]} metadata block(s)"
        + (f" of {total}" if total else "") + f", {counts[F.KIND_PACK]} pack(s), "
        f"{counts[F.KIND_TABLE]} chunk table(s)")
    with capsys.disabled():
        print(f"\n[lazy 500k] {what}: {wall:.2f} s, peak RSS {rss_kb / 1024:.0f} MiB{blocks}")


def test_generated_index_is_complete(many: Path) -> None:
    with imagefs.Image.open(str(many)) as img:
        (entry,) = img.indices
        assert entry.files == MANY_DIRS * MANY_FILES_PER_DIR == 500_000
        assert entry.dirs == MANY_DIRS + 1


def test_info_reads_no_metadata(many: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, counts = cli_in_process("info", str(many), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["indices"][0]["files"] == 500_000
    assert counts[F.KIND_META] == 0 and counts[F.KIND_PACK] == 0
    assert counts[F.KIND_TABLE] == 0
    proc, wall, rss = cli_measured("info", str(many))
    assert b"500000" in proc.stdout
    report(capsys, "info", wall, rss, counts)
    assert rss < RSS_LIMIT_KB


@pytest.mark.parametrize("long", [False, True], ids=["ls", "ls-l"])
def test_ls_of_one_directory_reads_a_few_blocks(many: Path, meta_blocks_total: int,
                                                long: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ls", str(many), "1", "/d0500", *(["-l"] if long else [])]
    code, out, counts = cli_in_process(*args)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == MANY_FILES_PER_DIR
    assert [ln.split()[-1] for ln in lines] == [b"f%05d" % i for i in range(MANY_FILES_PER_DIR)]
    if long:
        assert lines[7].startswith(b"-rw-r--r--")
        assert b" %d " % len(many_files_content(500, 7)) in lines[7]
    assert meta_blocks_total > 500
    # root, the directory, and the block(s) its 500 children were packed into
    assert counts[F.KIND_META] <= 5, counts
    assert counts[F.KIND_PACK] == 0 and counts[F.KIND_TABLE] == 0
    proc, wall, rss = cli_measured(*args)
    assert proc.stdout == out
    report(capsys, " ".join(["ls", *args[3:]]), wall, rss, counts, meta_blocks_total)
    assert rss < RSS_LIMIT_KB


def test_cat_of_one_file_reads_a_few_blocks_and_one_pack(
        many: Path, meta_blocks_total: int, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["cat", str(many), "1", "/d0731/f00123"]
    code, out, counts = cli_in_process(*args)
    assert code == 0
    assert out == many_files_content(731, 123)
    assert counts[F.KIND_META] <= 4, counts
    assert counts[F.KIND_PACK] == 1, counts
    assert counts[F.KIND_TABLE] == 0
    proc, wall, rss = cli_measured(*args)
    assert proc.stdout == out
    report(capsys, "cat /d0731/f00123", wall, rss, counts, meta_blocks_total)
    assert rss < RSS_LIMIT_KB


def test_view_api_reads_lazily(many: Path) -> None:
    with count_frames() as counts, imagefs.Image.open(str(many)) as img:
        view = img.view("many")
        assert counts[F.KIND_META] == 0
        ino = view.lookup("/d0042/f00499")
        assert view.read(ino, 0, 1 << 20) == many_files_content(42, 499)
        assert view.read(ino, 5, 3) == many_files_content(42, 499)[5:8]
        assert view.packs.decompressions == 1  # the second read hit the pack cache
        assert counts[F.KIND_META] <= 4
        # A sibling's record and content come from the blocks already read.
        before = counts.copy()
        sib = view.lookup("/d0042/f00498")
        assert view.read(sib, 0, 100) == many_files_content(42, 498)
        assert counts[F.KIND_PACK] == before[F.KIND_PACK]
        assert counts[F.KIND_META] <= before[F.KIND_META] + 1


def test_ls_long_of_the_root_does_not_read_every_block(
        many: Path, meta_blocks_total: int, capsys: pytest.CaptureFixture[str]) -> None:
    """`ls -l /` (and a mount's readdirplus of /) needs the 1000 directory records under
    the root.  Each directory record is written right after its 500 children, so the 1000
    records lie in ~1000 different metadata blocks: listing the root decodes every block of
    the index.  Requirement 7 says `ls` must not read all of the metadata; keeping
    directory records together (e.g. a separate MetaWriter stream for directories in
    writer.write_tree) would make this a few dozen blocks."""
    args = ["ls", str(many), "1", "/", "-l"]
    code, out, counts = cli_in_process(*args)
    assert code == 0 and out.count(b"\n") == MANY_DIRS
    proc, wall, rss = cli_measured(*args)
    report(capsys, "ls -l /", wall, rss, counts, meta_blocks_total)
    assert rss < RSS_LIMIT_KB
    assert counts[F.KIND_META] <= meta_blocks_total // 4, (
        f"ls -l / decoded {counts[F.KIND_META]} of {meta_blocks_total} metadata blocks")
