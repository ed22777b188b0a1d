"""The compact profile (issue 16): --compact on capture, export and optimize writes 8 MiB
packs at zstd 19, smaller than the default file, and stays a filesystem: exact, mountable,
and a small file read decompresses one pack."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import assert_same_tree, mounted, run_imagefs

from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.view import IndexView
from imagefs.image import Image

COMPACT_PACK = 8 << 20


def _text_tree(root: Path, seed: int) -> Path:
    """~4 MiB of text-like files that share vocabulary across files (what a bigger frame
    finds), in a few directories."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"etaoinshrdlucmfwyp", k=rng.randint(3, 10)))
             for _ in range(20000)]
    for d in range(4):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(4):
            (sub / f"f{i}.txt").write_bytes(b" ".join(rng.choices(words, k=40000)))
    (root / "small.conf").write_text("key = value\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _text_tree(tmp_path_factory.mktemp("compact") / "tree", 5)


def _pack_target(image: Path) -> int:
    with ImageFile.open(str(image)) as f:
        return f.header.pack_target


def test_capture_compact_is_smaller_and_exact(tree: Path, tmp_path: Path) -> None:
    default, compact = tmp_path / "default.imagefs", tmp_path / "compact.imagefs"
    run_imagefs("capture", tree, default, "--name", "t")
    run_imagefs("capture", tree, compact, "--name", "t", "--compact")
    assert _pack_target(compact) == COMPACT_PACK and _pack_target(default) == F.PACK_TARGET
    assert compact.stat().st_size < default.stat().st_size * 0.97
    run_imagefs("verify", compact)
    applied = tmp_path / "applied"
    run_imagefs("apply", compact, "1", applied)
    assert_same_tree(tree, applied)
    history = json.loads(run_imagefs("info", compact, "1", "--history", "--json").stdout)
    assert history["indices"][0]["history"][0]["profile"] == "compact"


def test_export_and_optimize_compact(tree: Path, tmp_path: Path) -> None:
    default = tmp_path / "default.imagefs"
    run_imagefs("capture", tree, default, "--name", "t")
    out = tmp_path / "out.imagefs"
    run_imagefs("export", default, "all", out, "--compact")
    assert _pack_target(out) == COMPACT_PACK
    assert out.stat().st_size < default.stat().st_size * 0.97
    run_imagefs("verify", out)
    again = shutil.copyfile(default, tmp_path / "again.imagefs")
    run_imagefs("optimize", again, "--compact")
    assert _pack_target(again) == COMPACT_PACK
    assert again.stat().st_size == pytest.approx(out.stat().st_size, rel=0.01)
    applied = tmp_path / "applied"
    run_imagefs("apply", again, "t", applied)
    assert_same_tree(tree, applied)


def test_a_small_file_reads_one_pack(tree: Path, tmp_path: Path) -> None:
    compact = tmp_path / "compact.imagefs"
    run_imagefs("capture", tree, compact, "--name", "t", "--compact")
    with Image.open(str(compact)) as img:
        view: IndexView = img.view(1)
        ino = view.lookup("/small.conf")
        assert view.read(ino, 0, 100) == b"key = value\n"
        assert view.packs.decompressions == 1


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fusermount3") is None,
                    reason="needs root and FUSE")
def test_a_compact_file_mounts(tree: Path, tmp_path: Path) -> None:
    compact = tmp_path / "compact.imagefs"
    run_imagefs("capture", tree, compact, "--name", "t", "--compact")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(compact, "1", mnt):
        assert_same_tree(tree, mnt)
