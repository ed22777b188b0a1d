"""Damaged, foreign and hostile files: a clear one-line error from every verb.

Design requirement 10: a damaged or hostile file gives a clear error (what, where), never a
traceback, a hang, a huge allocation, or a write outside the destination.  Every case here
runs the real CLI in a subprocess (with a time limit and an address-space limit) and checks:
non-zero exit, exactly one stderr line starting "imagefs:", no traceback, no internal error
(exit 70), no file written outside DEST, and the image file left as it was.

The hostile images are built with the real writer classes (Transaction, PackWriter,
MetaWriter, writer.write_tree, ImageFile.append_frame/append_raw), so every frame has valid
checksums and only the crafted content is wrong.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cli_zygote
import pytest
import xxhash
import zstandard

from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.packs import ChunkLoc
from imagefs.format.records import Inode
from imagefs.format.writer import PendingInode as Node
from imagefs.format.writer import (
    Transaction,
    TreeStats,
    add_index,
    history_entry,
    write_tree,
)
from imagefs.image import Image, capture

INTERNAL_ERROR = 70
MEMORY_LIMIT = 1 << 30  # a reader that believes a hostile size runs into this
T = 1_700_000_000_123_456_789


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@dataclass
class Result:
    args: tuple[str, ...]
    code: int
    stdout: bytes
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"imagefs {' '.join(self.args)} -> {self.code}\n{self.stderr}"


def run_cli(*args: object, timeout: float = 30, limit_memory: bool = True) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_")}
    env["MALLOC_ARENA_MAX"] = "2"  # so that the address-space limit counts real allocations
    sargs = tuple(map(str, args))
    start = time.monotonic()
    p = cli_zygote.run(sargs, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                       rlimit_as=MEMORY_LIMIT if limit_memory else None)
    r = Result(sargs, p.returncode, p.stdout, p.stderr.decode(errors="replace"),
               time.monotonic() - start)
    assert "Traceback" not in r.stderr, str(r)
    assert r.code != INTERNAL_ERROR, str(r)
    assert r.code >= 0, f"killed by signal: {r}"
    return r


def assert_clear_failure(r: Result, codes: tuple[int, ...] | None = None) -> str:
    assert r.code != 0, f"expected a failure: {r}"
    if codes is not None:
        assert r.code in codes, str(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr: {r}"
    assert lines[0].startswith("imagefs: "), str(r)
    assert len(lines[0]) < 2000, str(r)
    assert r.seconds < 15, f"took {r.seconds:.1f}s: {r}"
    return lines[0]


def digest_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the verbs, each with arguments that make sense for a two-index image ---------------

VERBS: dict[str, Callable[[Path, Path, str], list[object]]] = {
    "info": lambda img, w, v: ["info", img],
    "info-json": lambda img, w, v: ["info", img, "2", "--json"],
    "info-space": lambda img, w, v: ["info", img, "--space"],
    "ls": lambda img, w, v: ["ls", img, "2"],
    "ls-l": lambda img, w, v: ["ls", img, "2", "/", "-l"],
    "ls-R": lambda img, w, v: ["ls", img, "2", "/", "-R"],
    "cat": lambda img, w, v: ["cat", img, "2", v],
    "extract": lambda img, w, v: ["extract", img, "2", v, "--dest", w / "extract"],
    "extract-root": lambda img, w, v: ["extract", img, "2", "/", "--dest", w / "extract-root"],
    "apply": lambda img, w, v: ["apply", img, "2", w / "apply"],
    "verify": lambda img, w, v: ["verify", img],
    "verify-json": lambda img, w, v: ["verify", img, "--json"],
    "delete": lambda img, w, v: ["delete", img, "2", "--wait", "5"],
    "export": lambda img, w, v: ["export", img, "2", w / "export.ifs", "--level", "1"],
    "export-moved": lambda img, w, v: ["export", img, "2", w / "export-moved.ifs"],
    "export-compact": lambda img, w, v: ["export", img, "2", w / "export-compact.ifs",
                                         "--compact", "--level", "1"],
    "optimize": lambda img, w, v: ["optimize", img, "--wait", "5"],
    "diff": lambda img, w, v: ["diff", img, "1", "2"],
    "capture": lambda img, w, v: ["capture", w / "src", img, "--name", "more", "--wait", "5"],
}
# A file that is not a (whole) image: every verb, plus capture appending to it.
FILE_VERBS = ["info", "ls", "cat", "extract", "apply", "verify", "delete", "export",
              "export-moved", "export-compact", "optimize", "diff", "capture"]
# Crafted records: every verb that reads them (info and delete read only the commit).
READ_ALL = ["ls", "cat", "extract-root", "apply", "verify", "export", "export-moved",
            "export-compact", "optimize", "info-space", "diff"]
CHILD = ["ls-l", "cat", "extract-root", "apply", "verify", "export", "export-moved",
         "export-compact", "optimize", "info-space", "diff"]
DATA = ["cat", "extract", "apply", "verify", "export", "export-moved", "export-compact", "optimize"]
# Variants of a case above that take the same path through the code: the writing verbs.
FEW = ["ls-R", "extract-root", "apply", "verify-json"]
FEW_DATA = ["cat", "apply", "verify"]


def run_verbs(image: Path, work: Path, verbs: list[str], victim: str = "/victim",
              codes: tuple[int, ...] | None = None, crafted: bool = False) -> list[str]:
    """Run each verb against image (in parallel); every one must fail clearly, write
    nothing outside its destination and leave the image as it was.  With crafted, the
    exit code must say "damaged image" (4), or for verify "damage found" (1)."""
    outside = work / "outside"
    outside.mkdir(exist_ok=True)
    src = work / "src"
    if not src.exists():
        src.mkdir()
        (src / "f").write_bytes(b"content for an append\n")
    before = digest_file(image)
    jobs = [VERBS[v](image, work, victim) for v in verbs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda a: run_cli(*a), jobs))
    lines = []
    for verb, r in zip(verbs, results, strict=True):
        if crafted:
            codes = (1,) if verb.startswith("verify") else (4,)
        lines.append(assert_clear_failure(r, codes))
    assert os.listdir(outside) == [], "something was written outside the destination"
    assert digest_file(image) == before, "a failed command changed the image file"
    assert not (work / "export.ifs").exists()
    assert not (work / "export-moved.ifs").exists()
    assert not (work / "export-compact.ifs").exists()
    return lines


# ---- a genuine image to damage ----------------------------------------------------------


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile-good")
    rng = random.Random(7)
    src = base / "src"
    (src / "d").mkdir(parents=True)
    (src / "victim").write_bytes(rng.randbytes(300_000))
    (src / "d" / "a.txt").write_text("a text file\n" * 100)
    (src / "big").write_bytes(rng.randbytes(1_500_000))
    img = base / "good.ifs"
    capture(str(img), str(src), "one", level=1)
    (src / "two.txt").write_text("only in two\n")
    capture(str(img), str(src), "two", level=1)
    return img


def _copy(good: Path, tmp_path: Path) -> Path:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good, img)
    return img


@pytest.mark.parametrize("length", ["0", "10", "100", "4096", "half", "size-1"])
def test_truncated(good_image: Path, tmp_path: Path, length: str) -> None:
    img = _copy(good_image, tmp_path)
    size = img.stat().st_size
    n = {"half": size // 2, "size-1": size - 1}.get(length) or int(length)
    os.truncate(img, n)
    lines = run_verbs(img, tmp_path, FILE_VERBS, codes=(4,))
    if n < F.HEADER_USED:
        assert all("not an imagefs image" in line for line in lines), lines


@pytest.mark.parametrize("kind", ["text", "random", "directory", "missing", "zeros",
                                  "magic-only"])
def test_not_an_image(tmp_path: Path, kind: str) -> None:
    img = tmp_path / "image.ifs"
    if kind == "text":
        img.write_text("this is a text file, not an image\n" * 200)
    elif kind == "random":
        img.write_bytes(random.Random(1).randbytes(20_000))
    elif kind == "directory":
        img.mkdir()
        (img / "inside").write_text("x")
    elif kind == "zeros":
        img.write_bytes(bytes(8192))
    elif kind == "magic-only":
        img.write_bytes(F.MAGIC + random.Random(2).randbytes(9000))
    verbs = [v for v in FILE_VERBS if not (kind == "missing" and v == "capture")]
    lines = run_verbs(img, tmp_path, verbs, codes=(3,) if kind == "missing" else (4, 5))
    if kind == "missing":
        assert all("no such image file" in line for line in lines), lines
    elif kind == "magic-only":
        # Junk after the magic: a damaged header, or (the version field is checked first,
        # so that a future header layout is reported as such) a "newer" version.
        assert all("checksum" in line or "newer" in line for line in lines), lines
    else:
        assert all("not an imagefs image" in line for line in lines), lines


def test_future_version(good_image: Path, tmp_path: Path) -> None:
    img = _copy(good_image, tmp_path)
    with open(img, "r+b") as fh:
        head = bytearray(fh.read(F.HEADER.size))
        head[8:12] = (F.FORMAT_VERSION + 1).to_bytes(4, "little")
        fh.seek(0)
        fh.write(head + xxhash.xxh3_64_intdigest(bytes(head)).to_bytes(8, "little"))
    lines = run_verbs(img, tmp_path, FILE_VERBS, codes=(5,))
    for line in lines:
        assert f"format version {F.FORMAT_VERSION + 1}" in line and "newer" in line, line


# ---- crafted images ---------------------------------------------------------------------


def ino(kind: int, size: int = 0, mode: int | None = None, nlink: int = 1) -> Inode:
    default = {F.REG: 0o100644, F.DIR: 0o40755, F.LNK: 0o120777}[kind]
    return Inode(kind=kind, mode=mode if mode is not None else default, uid=0, gid=0,
                 nlink=nlink, size=size, rdev=0, mtime_ns=T, atime_ns=T, ctime_ns=T)


class Crafter:
    """Appends a hand-made index 2 to an image through the real writer classes.

    Phases, in file order: content chunks (file()), then hand-made frames (frame(),
    meta_block()), then records (raw(), and finally write_tree of the root)."""

    def __init__(self, f: ImageFile, tx: Transaction) -> None:
        self.f = f
        self.tx = tx
        self.packs = tx.pack_writer()
        self.sealed = False

    def file(self, data: bytes) -> Node:
        assert not self.sealed
        node = Node(ino(F.REG, len(data)))
        node.locs = [(0, self.packs.add_chunk(data))] if data else []
        return node

    def seal(self) -> None:
        if not self.sealed:
            self.packs.finish()
            self.tx.packs = None
            self.sealed = True

    def frame(self, kind: bytes, payload: bytes, raw_len: int, codec: int) -> int:
        self.seal()
        return self.f.append_frame(kind, payload, raw_len, codec)

    def meta_block(self, build: Callable[[int], bytes]) -> int:
        """A hand-made metadata block; build gets the block's offset (for self-refs)."""
        self.seal()
        return self.f.append_raw(F.KIND_META, build(self.f.append_pos), 3)

    def raw_node(self, kind: int, ref: int) -> Node:
        """A directory entry pointing at ref (whatever is there)."""
        node = Node(ino(kind))
        node.ref = ref
        return node

    @staticmethod
    def dir(entries: list[tuple[bytes, Node]], sort: bool = True) -> Node:
        return Node(ino(F.DIR), children=sorted(entries, key=lambda e: e[0]) if sort
                    else entries)

    @staticmethod
    def link(target: bytes) -> Node:
        n = Node(ino(F.LNK, len(target)))
        n.ino.target = target
        return n

    @staticmethod
    def data_file(size: int, pack: int, offset: int, length: int, xxh: bytes) -> Node:
        n = Node(ino(F.REG, size))
        n.locs = [(0, ChunkLoc(pack, offset, length, xxh, bytes(32)))]
        return n


def block_bytes(records: list[bytes]) -> bytes:
    """A metadata block payload laid out as _format describes."""
    count = len(records)
    pos = 4 + 4 * (count + 1)
    offsets = []
    for r in records:
        offsets.append(pos)
        pos += len(r)
    offsets.append(pos)
    return F.U32.pack(count) + b"".join(F.U32.pack(o) for o in offsets) + b"".join(records)


def make_crafted(tmp_path: Path, build: Callable[[Crafter], Node],
                 root_ref: Callable[[int], int] | None = None,
                 tables: Callable[[list[list[int]], int], list[list[int]]] | None = None
                 ) -> Path:
    src = tmp_path / "good-src"
    (src / "d").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "d" / "x").write_bytes(b"x" * 5000)
    img = tmp_path / "image.ifs"
    capture(str(img), str(src), "one", level=1)
    with ImageFile.open(str(img), writable=True) as f, Transaction(f, 3) as tx:
        cr = Crafter(f, tx)
        root = build(cr)
        cr.seal()
        from imagefs.format.records import MetaWriter
        meta = MetaWriter(f, 3)
        stats = write_tree(meta, root)
        meta.flush()
        if root_ref is not None:
            stats = TreeStats(root_ref(stats.root), stats.digest, stats.files, stats.dirs,
                              stats.bytes)
        add_index(tx.commit, "two", "crafted", stats, history_entry("craft"))
        if tables is not None:
            # publish() appends this transaction's chunk-table segment; replace afterwards
            # is impossible, so write it ourselves and hand publish() nothing new.
            raw = tx._table.encode_new() if tx._table is not None else b""
            if raw:
                off = f.append_raw(F.KIND_TABLE, raw, 1)
                tx.commit.tables.append([off, len(tx._table.new)])  # type: ignore[union-attr]
                tx._table.new = []  # type: ignore[union-attr]
            tx.commit.tables = tables(tx.commit.tables, f.append_pos)
        tx.publish()
    return img


def _patch(rec: bytes, offset: int, value: bytes) -> bytes:
    return rec[:offset] + value + rec[offset + len(value):]


def _victim_extents_record(count: int) -> bytes:
    n = ino(F.REG, 10)
    n.extents = [(0, 1 << 20, 0, 10, bytes(16))]
    return _patch(n.encode(), F.INODE.size, F.U32.pack(count))


def _zstd_stream(total: int, with_size: bool) -> bytes:
    c = zstandard.ZstdCompressor(level=1, write_content_size=with_size)
    o = c.compressobj(size=total if with_size else -1)
    block = bytes(1 << 20)
    out = [o.compress(block) for _ in range(total >> 20)]
    out.append(o.flush())
    return b"".join(out)


def _zstd_lying_size(total: int, claimed: int) -> bytes:
    """A zstd frame of `total` zero bytes whose header claims `claimed` bytes."""
    frame = bytearray(_zstd_stream(total, True))
    fhd = frame[4]
    fcs_flag, single, did = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    assert fcs_flag == 2, "expected a 4-byte content size field"
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did]
    frame[pos:pos + 4] = claimed.to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(frame)) == claimed
    return bytes(frame)


_BOMBS: dict[str, bytes] = {}


def bomb(kind: str) -> bytes:
    if kind not in _BOMBS:
        _BOMBS[kind] = (_zstd_stream(1 << 30, False) if kind == "unsized"
                        else _zstd_lying_size(1 << 30, 1 << 20))
    return _BOMBS[kind]


ZERO_XXH = xxhash.xxh3_128_digest(bytes(4096))


def _c_name(name: bytes) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        f = cr.file(b"escaped\n")
        g = cr.file(b"victim\n")
        return cr.dir([(name, f), (b"victim", g)], sort=False)
    return build


def _c_dotdot_dir(cr: Crafter) -> Node:
    inner = cr.dir([(b"escaped", cr.file(b"written outside?\n"))])
    return cr.dir([(b"..", inner), (b"victim", cr.file(b"v\n"))])


def _c_dup(symlink_first: bool, outside: Path) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        pwned = cr.file(b"pwned\n")
        link = cr.link(str(outside).encode())
        d = cr.dir([(b"pwned", pwned)])
        pair = [(b"a", link), (b"a", d)] if symlink_first else [(b"a", d), (b"a", link)]
        return cr.dir([*pair, (b"victim", cr.file(b"v\n"))], sort=False)
    return build


def _c_record(rec: Callable[[], bytes], kind: int = F.REG) -> Callable[[Crafter], Node]:
    """The root holds "victim" whose record is the given bytes."""
    def build(cr: Crafter) -> Node:
        off = cr.meta_block(lambda at: block_bytes([rec()]))
        return cr.dir([(b"victim", cr.raw_node(kind, off << 16)),
                       (b"ok", cr.dir([]))])
    return build


def _rec_dir_count() -> bytes:
    n = ino(F.DIR, 1)
    n.entries = [(b"x", F.REG, 1 << 16)]
    return _patch(n.encode(), F.INODE.size, F.U32.pack(0xFFFFFFFF))


def _rec_xattr_count() -> bytes:
    return _patch(ino(F.REG).encode(), 2, (60000).to_bytes(2, "little"))


def _rec_xattr_size() -> bytes:
    n = ino(F.REG)
    n.xattrs = [(b"user.a", b"v")]
    return _patch(n.encode(), F.INODE.size + 1, F.U32.pack(0xFFFFFFF0))


def _rec_symlink_size() -> bytes:
    n = ino(F.LNK, 4000)
    n.target = b"abc"
    return n.encode()


def _rec_extent_past_size() -> bytes:
    n = ino(F.REG, 10)
    n.extents = [(0, 1 << 20, 0, 4096, bytes(16))]
    return n.encode()


def _rec_dir_size_huge() -> bytes:
    n = ino(F.DIR, 1 << 40)
    return n.encode()


def _c_block(build_block: Callable[[int], bytes], number: int = 0
             ) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        off = cr.meta_block(build_block)
        return cr.dir([(b"victim", cr.raw_node(F.REG, off << 16 | number)),
                       (b"ok", cr.dir([]))])
    return build


def _c_ref(ref: Callable[[Crafter], int]) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        r = ref(cr)
        return cr.dir([(b"victim", cr.raw_node(F.REG, r)), (b"ok", cr.dir([]))])
    return build


def _pack_ref(cr: Crafter) -> int:
    cr.file(b"some content\n")
    cr.seal()
    return cr.f.append_pos - 1 << 16  # inside the pack frame just written: not a frame


def _first_pack_ref(cr: Crafter) -> int:
    return F.HEADER_SIZE << 16  # the first pack of index 1: not a metadata block


def _c_cycle(cr: Crafter) -> Node:
    victim = cr.file(b"v\n")

    def block(at: int) -> bytes:
        d = ino(F.DIR, 1)
        d.entries = [(b"loop", F.DIR, at << 16)]
        return block_bytes([d.encode()])
    off = cr.meta_block(block)
    return cr.dir([(b"loop", cr.raw_node(F.DIR, off << 16)), (b"victim", victim)])


def _c_pack(payload: Callable[[], bytes], raw_len: int, length: int = 4096,
            xxh: bytes = ZERO_XXH, codec: int = F.CODEC_ZSTD) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        ok = cr.file(b"fine\n")
        off = cr.frame(F.KIND_PACK, payload(), raw_len, codec)
        return cr.dir([(b"victim", cr.data_file(length, off, 0, length, xxh)), (b"ok", ok)])
    return build


def _c_extent(pack: Callable[[Crafter], int] | None, offset: int, length: int,
              xxh: bytes | None = None) -> Callable[[Crafter], Node]:
    def build(cr: Crafter) -> Node:
        loc = cr.packs.add_chunk(b"real chunk content\n" * 10)
        ok = cr.file(b"fine\n")
        cr.seal()
        p = pack(cr) if pack is not None else loc.pack_id()
        return cr.dir([(b"victim", cr.data_file(length, p, offset, length,
                                                xxh if xxh is not None else loc.xxh)),
                       (b"ok", ok)])
    return build


def _c_plain(cr: Crafter) -> Node:
    return cr.dir([(b"victim", cr.file(b"v\n")), (b"d", cr.dir([(b"x", cr.file(b"x"))]))])


def _c_root_file(cr: Crafter) -> Node:
    return cr.file(b"i am not a directory\n")


def _pack_outside(cr: Crafter) -> int:
    return 1 << 40


CASES: dict[str, tuple[Callable[[Path], Callable[[Crafter], Node]], list[str], dict]] = {
    "name-slash": (lambda o: _c_name(b"a/b"), READ_ALL, {}),
    "name-dotdot-file": (lambda o: _c_name(b".."), READ_ALL, {}),
    "name-dot": (lambda o: _c_name(b"."), FEW, {}),
    "name-empty": (lambda o: _c_name(b""), FEW, {}),
    "name-nul": (lambda o: _c_name(b"a\0b"), FEW, {}),
    "name-absolute": (lambda o: _c_name(str(o).encode() + b"/pwned"), FEW, {}),
    "name-dotdot-dir": (lambda o: _c_dotdot_dir, READ_ALL, {}),
    "dup-symlink-then-dir": (lambda o: _c_dup(True, o), READ_ALL, {}),
    "dup-dir-then-symlink": (lambda o: _c_dup(False, o), FEW, {}),
    "extent-count-huge": (lambda o: _c_record(lambda: _victim_extents_record(0xFFFFFFFF)),
                          CHILD, {}),
    "dir-count-huge": (lambda o: _c_record(_rec_dir_count, F.DIR), CHILD, {}),
    "dir-size-huge": (lambda o: _c_record(_rec_dir_size_huge, F.DIR), FEW, {}),
    "xattr-count-huge": (lambda o: _c_record(_rec_xattr_count), CHILD, {}),
    "xattr-size-huge": (lambda o: _c_record(_rec_xattr_size), FEW, {}),
    "symlink-size-wrong": (lambda o: _c_record(_rec_symlink_size, F.LNK), CHILD, {}),
    "extent-past-size": (lambda o: _c_record(_rec_extent_past_size), FEW, {}),
    "block-count-huge": (lambda o: _c_block(lambda at: F.U32.pack(0xFFFFFFFF) + bytes(8)),
                         CHILD, {}),
    "block-offsets-past-end": (lambda o: _c_block(
        lambda at: F.U32.pack(1) + F.U32.pack(12) + F.U32.pack(1 << 30) + bytes(200)),
        FEW, {}),
    "record-number-missing": (lambda o: _c_block(
        lambda at: block_bytes([ino(F.REG).encode() + bytes(4)]), number=999), FEW, {}),
    "ref-past-file": (lambda o: _c_ref(lambda cr: 1 << 56), CHILD, {}),
    "ref-not-a-frame": (lambda o: _c_ref(_pack_ref), FEW, {}),
    "ref-to-a-pack": (lambda o: _c_ref(_first_pack_ref), FEW, {}),
    "dir-cycle": (lambda o: _c_cycle, ["ls-R", "extract-root", "apply", "verify", "export",
                                       "diff"], {}),
    "root-not-dir": (lambda o: _c_root_file, READ_ALL, {}),
    "root-ref-mid-frame": (lambda o: _c_plain, FEW,
                           {"root_ref": lambda r: ((r >> 16) + 20) << 16}),
    "root-ref-past-file": (lambda o: _c_plain, ["info", *READ_ALL],
                           {"root_ref": lambda r: 1 << 56, "commit_broken": True}),
    "root-ref-bad-record": (lambda o: _c_plain, READ_ALL, {"root_ref": lambda r: r + 500}),
    "pack-claims-gigabytes": (lambda o: _c_pack(lambda: zstandard.compress(bytes(4096)),
                                                4 << 30), DATA, {}),
    "pack-claims-gigabytes-stored": (
        lambda o: _c_pack(lambda: bytes(4096), 3 << 30, codec=F.CODEC_STORED), FEW_DATA, {}),
    "pack-raw-length-lies": (lambda o: _c_pack(lambda: zstandard.compress(bytes(4096)),
                                               1 << 20), DATA, {}),
    "zstd-bomb-unsized": (lambda o: _c_pack(lambda: bomb("unsized"), 1 << 20), DATA, {}),
    "zstd-bomb-lying-size": (lambda o: _c_pack(lambda: bomb("lying"), 1 << 20), DATA, {}),
    "zstd-garbage": (lambda o: _c_pack(lambda: random.Random(3).randbytes(5000), 4096),
                     FEW_DATA, {}),
    "extent-past-pack": (lambda o: _c_extent(None, 100, 1 << 20), DATA, {}),
    "extent-pack-outside-file": (lambda o: _c_extent(_pack_outside, 0, 190), FEW_DATA, {}),
    "extent-wrong-xxh": (lambda o: _c_extent(None, 0, 190, xxh=bytes(16)), FEW_DATA,
                         {}),
    "table-count-huge": (lambda o: _c_plain, ["verify", "capture"],
                         {"tables": lambda t, size: [[t[0][0], size]]}),
    "table-not-a-table": (lambda o: _c_plain, ["verify", "capture"],
                          {"tables": lambda t, size: [[F.HEADER_SIZE, 1]]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    make, verbs, kw = CASES[case]
    kw = dict(kw)
    commit_broken = kw.pop("commit_broken", False)
    img = make_crafted(tmp_path, make(outside), **kw)
    lines = run_verbs(img, tmp_path, verbs, crafted=not commit_broken)
    if commit_broken:
        assert all("commit record is malformed" in line for line in lines), lines
    if case.startswith("table-"):
        assert all("chunk table" in line or "'T' frame" in line or "verify found" in line
                   for line in lines), lines
    if not commit_broken:
        # Index 1 of the same file is untouched by the crafted index 2.
        with Image.open(str(img)) as image:
            view = image.view(1)
            assert view.read(view.lookup("/hello.txt"), 0, 100) == b"hello\n"


def test_symlinks_are_never_followed_out(tmp_path: Path) -> None:
    """Legitimate symlinks to outside places are applied as symlinks, never followed,
    and a path through them is looked up inside the image."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def build(cr: Crafter) -> Node:
        return cr.dir([
            (b"abs", cr.link(str(outside).encode())),
            (b"rel", cr.link(b"../../../../../../../../" + str(outside).encode())),
            (b"d", cr.dir([(b"f", cr.file(b"inside\n"))])),
        ])
    img = make_crafted(tmp_path, build)
    dest = tmp_path / "dest"
    r = run_cli("apply", img, "2", dest)
    assert r.code == 0, str(r)
    assert os.readlink(dest / "abs") == str(outside)
    for path in ("/abs/pwned", "/rel/pwned"):
        r = run_cli("extract", img, "2", path, "--dest", tmp_path / "x")
        assert_clear_failure(r, (3,))
        r = run_cli("cat", img, "2", path)
        assert_clear_failure(r, (3,))
    # Extracting through a symlink that already sits in DEST must not follow it.
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "d").symlink_to(outside)
    r = run_cli("extract", img, "2", "/d/f", "--dest", pre)
    assert_clear_failure(r, (7,))
    # apply replaces the symlink in DEST by the image's directory, inside DEST.
    r = run_cli("apply", img, "2", pre)
    assert r.code == 0, str(r)
    assert (pre / "d").is_dir() and not (pre / "d").is_symlink()
    assert os.listdir(outside) == []


# ---- bad usage --------------------------------------------------------------------------


@pytest.fixture()
def usage_image(good_image: Path, tmp_path: Path) -> Path:
    return _copy(good_image, tmp_path)


@pytest.mark.parametrize("args,code,words", [
    (["ls", "{img}", "nosuch"], 3, "no index 'nosuch'"),
    (["ls", "{img}", "0"], 3, "no index '0'"),
    (["ls", "{img}", "3"], 3, "no index '3'"),
    (["ls", "{img}", "-1"], 3, "no index '-1'"),
    (["cat", "{img}", "1", "/nosuch"], 3, "no such path"),
    (["cat", "{img}", "1", "/d"], 2, "not a regular file"),
    (["cat", "{img}", "1", "/victim/x"], 3, "not a directory"),
    (["extract", "{img}", "1", "/nosuch", "--dest", "{tmp}/x"], 3, "no such path"),
    (["diff", "{img}", "1", "nosuch"], 3, "no index"),
    (["info", "{img}", "7"], 3, "no index"),
    (["delete", "{img}", "0"], 3, "no index '0'"),
    (["delete", "{img}", "nosuch"], 3, "no index"),
    (["export", "{img}", "1,9", "{tmp}/out.ifs"], 3, "no index '9'"),
    (["export", "{img}", "1", "{tmp}/out.ifs", "--level", "99"], 2, "--level 99"),
    (["export", "{img}", "1", "{tmp}/nodir/out.ifs"], 7, "does not exist"),
    (["export", "{img}", "1", "{tmp}/text"], 7, "not an imagefs image"),
    (["export", "{img}", "1", "{img}"], 2, "same file"),
    (["capture", "{tmp}/src", "{img}", "--name", "x", "--level", "99"], 2, "--level 99"),
    (["capture", "{tmp}/src", "{img}", "--name", "x", "--level", "0"], 2, "--level 0"),
    (["capture", "{tmp}/text", "{img}", "--name", "x"], 2, "must be"),
    (["capture", "{tmp}/nosuch", "{img}", "--name", "x"], 2, "must be"),
    (["capture", "{tmp}/src", "{img}", "--name", "one"], 2, "already exists"),
    (["capture", "{tmp}/src", "{img}", "--name", "12"], 2, "not all digits"),
    (["capture", "{tmp}/src", "{img}", "--name", ""], 2, "1-255"),
    (["capture", "{tmp}/src", "{tmp}/nodir/new.ifs", "--name", "x"], 3, "does not exist"),
    (["apply", "{img}", "1", "{tmp}/text"], 7, "text"),
])
def test_bad_usage(usage_image: Path, tmp_path: Path, args: list[str], code: int | None,
                   words: str | None) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("f\n")
    (tmp_path / "text").write_text("not an image\n")
    before = digest_file(usage_image)
    full = [a.format(img=usage_image, tmp=tmp_path) for a in args]
    r = run_cli(*full)
    if code is None:  # argparse's own complaint: usage line, then one "imagefs:" line
        assert r.code == 2, str(r)
        assert r.stderr.splitlines()[-1].startswith("imagefs: "), str(r)
    else:
        line = assert_clear_failure(r, (code,))
        assert words in line, line
    assert digest_file(usage_image) == before, "a refused command changed the image"
    assert not (tmp_path / "out.ifs").exists()
    assert not (tmp_path / "x").exists() or os.listdir(tmp_path / "x") == []


@pytest.mark.parametrize("args", [[], ["nosuchverb"], ["ls"], ["capture", "a", "b"],
                                  ["ls", "img", "1", "--bogus"]])
def test_argparse_errors(args: list[str]) -> None:
    r = run_cli(*args)
    assert r.code == 2, str(r)
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("imagefs: "), str(r)
    assert sum(1 for line in lines if line.startswith("imagefs: ")) == 1, str(r)
