"""The compact profile stores like content together (issue 16: "order chunks by similarity
before packing, at least by file type and name"): content_class names a file's kind, and
capture --compact, export --compact and optimize --compact store by kind, then extension
and name."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import assert_same_tree, run_imagefs

from imagefs.content_class import KINDS, kind_of, order_key
from imagefs.format import layout as F
from imagefs.format.view import IndexView
from imagefs.image import Image


def _elf(etype: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + bytes(9) + etype.to_bytes(2, "little") + bytes(46)


@pytest.mark.parametrize(("name", "head", "kind"), [
    (b"libc.so.6", _elf(3), "elf-library"),
    (b"ls", _elf(3), "elf-executable"),  # a position-independent executable
    (b"init", _elf(2), "elf-executable"),
    (b"ext4.ko", _elf(1), "elf-object"),
    (b"changelog.Debian.gz", b"\x1f\x8b\x08\x00", "gzip"),
    (b"data.tar.xz", b"\xfd7zXZ\x00\x00", "xz"),
    (b"libc.mo", b"\xde\x12\x04\x95\x00\x00", "gettext"),
    (b"os.cpython-311.pyc", b"\xa7\x0d\x0d\x0a\x00\x00", "python-bytecode"),
    (b"tool", b"#!/usr/bin/python3\nimport os\n", "text-python"),
    (b"os.py", b"import sys\n", "text-python"),
    (b"Config.pm", b"package Config;\n", "text-perl"),
    (b"update", b"#!/bin/sh\nset -e\n", "text-script"),
    (b"stdio.h", b"#ifndef _STDIO_H\n", "text-c"),
    (b"passwd", b"root:x:0:0:root:/root:/bin/bash\n", "text"),
    (b"blob", b"\x01\x02\x00\x03", "binary"),
    (b"empty", b"", "text"),
    (b"short-elf", b"\x7fELF", "elf-other"),  # too short to say its type: no IndexError
])
def test_kinds(name: bytes, head: bytes, kind: str) -> None:
    assert kind_of(name, head) == kind


def test_compressed_kinds_go_last_and_keys_sort_by_extension_then_name() -> None:
    assert KINDS.index("gzip") > KINDS.index("elf-library") > KINDS.index("text")
    keys = sorted([order_key(b"b.txt", b"x"), order_key(b"a.conf", b"x"),
                   order_key(b"a.txt", b"x")])
    assert [k[2] for k in keys] == [b"a.conf", b"a.txt", b"b.txt"]


def _mixed_tree(root: Path) -> Path:
    """Text and binary files interleaved in the walk order: a0.txt, a1.bin, a2.txt, ..."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"etaoinshrd", k=rng.randint(3, 9))) for _ in range(3000)]
    root.mkdir(parents=True)
    for i in range(12):
        if i % 2:
            body = b"\0" + rng.randbytes(100_000)
            (root / f"a{i:02}.bin").write_bytes(body)
        else:
            (root / f"a{i:02}.txt").write_bytes(b" ".join(rng.choices(words, k=20_000)))
    return root


def _content_order(image: Path, number: int = 1) -> list[str]:
    """The image's files in the order their first chunks are stored."""
    with Image.open(str(image)) as img:
        view = IndexView(img.file, number, img.indices[number - 1])
        root = view.root()
        placed = []
        for name, _kind, ref in root.entries:
            ino = view.get(ref)
            if ino.kind == F.REG and ino.extents:
                placed.append(((ino.extents[0][1], ino.extents[0][2]), name.decode()))
    return [name for _place, name in sorted(placed)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mixed_tree(tmp_path_factory.mktemp("kinds") / "tree")


def _grouped(order: list[str]) -> bool:
    kinds = [name.endswith(".bin") for name in order]
    return kinds == sorted(kinds)  # every text file before every binary one


def test_capture_compact_groups_by_kind(mixed: Path, tmp_path: Path) -> None:
    default, compact = tmp_path / "default.imagefs", tmp_path / "compact.imagefs"
    run_imagefs("capture", mixed, default, "--name", "t", "--level", "1")
    run_imagefs("capture", mixed, compact, "--name", "t", "--compact", "--level", "1")
    assert not _grouped(_content_order(default))  # the walk order interleaves them
    assert _grouped(_content_order(compact))
    applied = tmp_path / "applied"
    run_imagefs("apply", compact, "1", applied)
    assert_same_tree(mixed, applied)


@pytest.mark.parametrize("verb", ["export", "optimize"])
def test_export_and_optimize_compact_group_by_kind(verb: str, mixed: Path,
                                                   tmp_path: Path) -> None:
    default = tmp_path / "default.imagefs"
    run_imagefs("capture", mixed, default, "--name", "t", "--level", "1")
    if verb == "export":
        out = tmp_path / "out.imagefs"
        run_imagefs("export", default, "all", out, "--compact", "--level", "1")
    else:
        out = shutil.copyfile(default, tmp_path / "out.imagefs")
        run_imagefs("optimize", out, "--compact", "--level", "1")
    assert _grouped(_content_order(out))
    run_imagefs("verify", out)
    applied = tmp_path / "applied"
    run_imagefs("apply", out, "1", applied)
    assert_same_tree(mixed, applied)
