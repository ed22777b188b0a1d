"""Dedup cannot be poisoned: equal fast hashes never make two different chunks one.

Design requirement 6.  With IMAGEFS_TEST_WEAK_FASTHASH=1 every chunk's xxh3 is the same
constant, so every chunk "collides" with every other; only the SHA-256 confirmation keeps
them apart.  Everything must still read back exactly and verify clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import cli_zygote
import pytest
from conftest import rsync_diff

from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.packs import PackReader
from imagefs.format.writer import Transaction

INTERNAL_ERROR = 70
WEAK = {"IMAGEFS_TEST_WEAK_FASTHASH": "1"}


def run_cli(*args: object, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_TEST_")}
    full.update(env or {})
    p = cli_zygote.run([str(a) for a in args], timeout=timeout, env=full)
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    assert p.returncode != INTERNAL_ERROR, p.stderr.decode(errors="replace")
    return p


def _tree(root: Path, seed: int) -> dict[str, bytes]:
    """Several different files: small ones, ones of many chunks, near-duplicates that
    differ in one byte (the case a weak identity check would merge), an empty one."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    base = rng.randbytes(300_000)
    files["a.bin"] = base
    files["a-one-byte-changed.bin"] = base[:150_000] + bytes([base[150_000] ^ 1]) + \
        base[150_001:]
    files["sub/text.txt"] = b"".join(f"line {i} of tree {seed}\n".encode()
                                     for i in range(5000))
    files["sub/small1"] = f"small one {seed}\n".encode()
    files["sub/small2"] = f"small two {seed}\n".encode()
    files["zeros"] = bytes(100_000)
    files["ones"] = b"\xff" * 100_000
    files["empty"] = b""
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


def test_weak_fast_hash_cannot_poison(tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    one, two = tmp_path / "one", tmp_path / "two"
    files1 = _tree(one, 1)
    files2 = _tree(two, 2)
    # Index 2 also repeats some of index 1's content, which must dedup to the right chunk.
    (two / "copy-of-a.bin").write_bytes(files1["a.bin"])
    files2["copy-of-a.bin"] = files1["a.bin"]
    for name, src in (("one", one), ("two", two)):
        p = run_cli("capture", src, img, "--name", name, "--level", "1", "--json", env=WEAK)
        assert p.returncode == 0, p.stderr
    for index, src, files in ((1, one, files1), (2, two, files2)):
        for path, data in files.items():
            if not path.startswith(("a", "copy")):
                continue  # apply + rsync -c below checks every file; cat the look-alikes
            p = run_cli("cat", img, index, "/" + path, env=WEAK)
            assert p.returncode == 0, p.stderr
            assert p.stdout == data, f"index {index} {path}: wrong bytes"
        dest = tmp_path / f"applied-{index}"
        p = run_cli("apply", img, index, dest, env=WEAK)
        assert p.returncode == 0, p.stderr
        assert rsync_diff(src, dest, extra=["--delete"]) == ""
    p = run_cli("verify", img, env=WEAK)
    assert p.returncode == 0, p.stdout + p.stderr
    # The copy in index 2 was deduplicated (against the right chunks), not stored again.
    p = run_cli("info", img, "--json", env=WEAK)
    assert p.returncode == 0
    doc = json.loads(p.stdout)
    logical = sum(map(len, files1.values())) + sum(map(len, files2.values()))
    assert doc["logical_bytes"] == logical
    assert doc["unique_bytes"] <= logical - len(files1["a.bin"]), doc
    # Without the weak hash the stored (constant) xxh3 values do not match: the reader
    # refuses, clearly, rather than return anything.
    p = run_cli("cat", img, "1", "/a.bin")
    assert p.returncode != 0
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: ") and "checksum" in lines[0]


def test_add_chunk_confirms_identity(tmp_path: Path) -> None:
    """In process: the same xxh but other content is another chunk; same content is the
    same chunk."""
    img = tmp_path / "image.ifs"
    ImageFile.create(str(img))
    a = b"content A " * 1000
    b = b"content B " * 1000
    forced = hashlib.md5(b"any 16 bytes").digest()
    with ImageFile.open(str(img), writable=True) as f, Transaction(f, 1) as tx:
        packs = tx.pack_writer()
        la = packs.add_chunk(a, xxh=forced)
        lb = packs.add_chunk(b, xxh=forced)
        la2 = packs.add_chunk(a, xxh=forced)
        lb2 = packs.add_chunk(b, xxh=forced)
        assert la is la2 and lb is lb2
        assert lb is not la
        assert (lb.offset, lb.length) != (la.offset, la.length)
        assert la.sha == hashlib.sha256(a).digest() and lb.sha == hashlib.sha256(b).digest()
        assert tx._table is not None and tx._table.count == 2
        packs.finish()
        tx.packs = None
        offsets = {la.pack_id(), lb.pack_id()}
        raw = {o: f.read_frame(o, F.KIND_PACK) for o in offsets}
        assert raw[la.pack_id()][la.offset:la.offset + la.length] == a
        assert raw[lb.pack_id()][lb.offset:lb.offset + lb.length] == b


def test_in_process_weak_hash_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """The same through the library, with the weak hash switched on in this process."""
    from imagefs.format import packs as packs_mod
    from imagefs.image import Image, capture
    monkeypatch.setattr(packs_mod, "_WEAK_FAST_HASH", True)
    src = tmp_path / "src"
    files = _tree(src, 3)
    img = tmp_path / "image.ifs"
    capture(str(img), str(src), "one", level=1)
    with Image.open(str(img)) as image:
        view = image.view(1)
        for path, data in files.items():
            ino = view.lookup("/" + path)
            assert view.read(ino, 0, len(data) + 10) == data, path
        assert isinstance(view.packs, PackReader)
