"""Hostile input, round 2: one regression test per finding of issue 12.

Each image here is crafted with valid checksums (frames, slots and header recomputed), so
that only the content behind the checksums is hostile, as an attacker's would be.  Every
verb must answer with one line and a documented exit code (4 for a damaged or hostile
image, 1 when verify finds damage), never 70, a traceback, a hang or a write outside DEST.
"""

# ruff: noqa: F811  (good_image is a fixture, imported, then named by the tests)
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted
from crafted import Editor, deep, write_header, write_slot
from test_hostile import (
    Crafter,
    assert_clear_failure,
    good_image,  # noqa: F401  (a fixture)
    ino,
    make_crafted,
    run_cli,
    run_verbs,
)

from imagefs.errors import UsageError
from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.packs import ChunkLoc
from imagefs.format.view import image_path_parts
from imagefs.format.writer import PendingInode as Node
from imagefs.image import capture

# ---- crafting helpers (tests/crafted.py writes the frames and slots, checksums valid) -----


def republish(img: Path, edit: Callable[[dict[str, Any]], Any] | None = None,
              raw: bytes | None = None) -> None:
    """Publish a new commit whose JSON is the current one passed through edit (which may
    change it in place or return another document), or raw bytes."""
    with Editor(img) as ed:
        doc = ed.commit_doc()
        out = edit(doc) if edit else None
        ed.publish(raw if raw is not None else doc if out is None else out)


def current_slot(img: Path) -> tuple[int, int, int, bytes]:
    with ImageFile.open(str(img)) as f:
        return max(s for s in f.read_slots() if isinstance(s, tuple))


MODES = {F.REG: 0o100644, F.DIR: 0o40755, F.LNK: 0o120777, F.CHR: 0o20644, F.BLK: 0o60644}


def node(kind: int, size: int = 0, **fields: Any) -> Node:
    n = Node(ino(F.REG, size))
    n.ino.kind, n.ino.mode = kind, MODES[kind]
    for k, v in fields.items():
        setattr(n.ino, k, v)
    return n


def crafted_record(tmp_path: Path, victim: Callable[[Crafter], Node]) -> Path:
    def build(cr: Crafter) -> Node:
        ok = cr.file(b"fine\n")  # content first: a victim may seal the packs
        return cr.dir([(b"victim", victim(cr)), (b"ok", ok)])
    return make_crafted(tmp_path, build)


# ---- 1. extract never writes outside --dest ------------------------------------------------


@pytest.mark.parametrize("path", ["/../../etc/hostname", "../etc/hostname",
                                  "/d/../../a.txt", "d/.."])
def test_extract_refuses_dotdot(good_image: Path, tmp_path: Path, path: str) -> None:
    dest = tmp_path / "a" / "b" / "dest"
    r = run_cli("extract", good_image, "1", path, "--dest", dest)
    line = assert_clear_failure(r, (2,))
    assert "'..' is not allowed" in line, line
    assert list(tmp_path.iterdir()) == [], "extract wrote something"


def test_extract_writes_the_clean_path(good_image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    r = run_cli("extract", good_image, "1", "//d/./a.txt", "--dest", dest)
    assert r.code == 0, str(r)
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "dest", "dest/d", "dest/d/a.txt"]


def test_image_paths_refuse_nul_and_dotdot() -> None:
    assert image_path_parts("//etc/./x/") == [b"etc", b"x"]
    for bad in ("a\0b", b"/etc/\0", "/a/../b", b".."):
        with pytest.raises(UsageError):
            image_path_parts(bad)


# ---- 2. every byte served is checked against the hash of exactly its range ---------------


def _skip_check(cr: Crafter) -> Node:
    """Two extents at the same pack offset: the first genuine, the second longer with a
    zero hash (a reader that remembers "offset checked" would serve it unchecked)."""
    data = os.urandom(20_000) + b"tail" * 10_000
    genuine = cr.packs.add_chunk(data[:20_000])
    cr.packs.add_chunk(data[20_000:])
    cr.seal()
    pack = genuine.pack_id()
    n = node(F.REG, 20_000 + 50_000)
    n.locs = [(0, genuine),
              (20_000, ChunkLoc(pack, genuine.offset, 50_000, bytes(16), bytes(32)))]
    return n


def test_a_checksum_cannot_be_skipped(tmp_path: Path) -> None:
    img = crafted_record(tmp_path, _skip_check)
    r = run_cli("cat", img, "2", "/victim")
    line = assert_clear_failure(r, (4,))
    assert "checksum mismatch" in line, line
    assert len(r.stdout) <= 20_000, "bytes nobody verified were served"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(img, "2", mnt):
        with pytest.raises(OSError) as err:
            (mnt / "victim").read_bytes()
        assert err.value.errno == 5  # EIO, never the unchecked bytes
        assert (mnt / "ok").read_bytes() == b"fine\n"


# ---- 4. crafted commit records and records: exit 4, never 70 ------------------------------


def _nested(depth: int) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["indices"][0]["history"].append({"action": "x", "result": deep(depth)})
    return edit


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        obj = doc
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


COMMITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "history-2000-deep": _nested(2000),
    "history-100000-deep": _nested(100_000),
    "history-16-deep": _nested(16),
    "table-entry-short": _set(("tables",), [[2597103]]),
    "table-entry-long": _set(("tables",), [[4096, 1, 2]]),
    "table-entry-not-a-list": _set(("tables",), [7]),
    "description-lone-surrogate": _set(("indices", 0, "description"), "\ud800"),
    "name-lone-surrogate": _set(("indices", 0, "name"), "a\udfffb"),
    "history-lone-surrogate": _set(("indices", 0, "history"), [{"action": "\ud800"}]),
    "history-key-surrogate": _set(("indices", 0, "history"), [{"\ud800": 1}]),
    "index-not-an-object": _set(("indices",), [[1, 2]]),
    "indices-not-a-list": _set(("indices",), {"a": 1}),
    "files-negative": _set(("indices", 0, "files"), -1),
    "files-huge": _set(("indices", 0, "files"), 10 ** 400),
    "files-bool": _set(("indices", 0, "files"), True),
    "not-an-object": lambda doc: [doc],
}


@pytest.mark.parametrize("case", list(COMMITS))
def test_crafted_commit_record(good_image: Path, tmp_path: Path, case: str) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    republish(img, COMMITS[case])
    r = run_cli("info", img, "--history")
    line = assert_clear_failure(r, (4,))
    assert line.count("damaged or hostile image") == 1, line
    assert "commit record" in line, line
    for args in (["info", img, "--json"], ["ls", img, "1"], ["verify", img]):
        assert_clear_failure(run_cli(*args), (4,))


def test_deep_json_at_the_parser(good_image: Path, tmp_path: Path) -> None:
    """A commit payload nested beyond the JSON parser's recursion limit."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    republish(img, raw=b"[" * 100_000 + b"]" * 100_000)
    line = assert_clear_failure(run_cli("info", img), (4,))
    assert "nested too deeply" in line, line


def test_history_within_the_bounds_prints(good_image: Path, tmp_path: Path
                                          ) -> None:
    """History within the bounds still prints, in full, as JSON."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    republish(img, _nested(10))
    r = run_cli("info", img, "1", "--history", "--json")
    assert r.code == 0, str(r)
    assert json.loads(r.stdout)["indices"][0]["history"][-1]["action"] == "x"


RECORDS: dict[str, Callable[[Crafter], Node]] = {
    "size-2^63": lambda cr: node(F.REG, 1 << 63),
    "size-2^64-1": lambda cr: node(F.REG, (1 << 64) - 1),
    "xattr-name-nul": lambda cr: node(F.REG, xattrs=[(b"user.a\0b", b"v")]),
    "xattr-name-no-namespace": lambda cr: node(F.REG, xattrs=[(b"nonsense", b"v")]),
    "xattr-name-bare-namespace": lambda cr: node(F.REG, xattrs=[(b"user.", b"v")]),
    "symlink-nul": lambda cr: node(F.LNK, 5, target=b"a\0b/c"),
    "chardev-major-huge": lambda cr: node(F.CHR, rdev=os.makedev(1 << 20, 1),
                                          mode=0o20644),
    "blockdev-minor-huge": lambda cr: node(F.BLK, rdev=os.makedev(8, 1 << 21),
                                           mode=0o60644),
    "chardev-rdev-all-ones": lambda cr: node(F.CHR, rdev=(1 << 64) - 1, mode=0o20644),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_crafted_record(tmp_path: Path, case: str) -> None:
    img = crafted_record(tmp_path, RECORDS[case])
    if case.startswith("size-"):  # the commit's byte count, which a reader checks, lies
        republish(img, lambda doc: doc["indices"][1].update(bytes=5))
    lines = run_verbs(img, tmp_path, ["apply", "extract-root", "ls-l", "verify", "export"],
                      crafted=True)
    assert all(line.count("damaged or hostile image") <= 1 for line in lines), lines


# ---- 5. work in proportion to the file ---------------------------------------------------


def test_many_indices_sharing_one_root(tmp_path: Path) -> None:
    """50 000 indices naming one tree of 1 000 files: the tree is checked once, not
    50 000 times (which took minutes)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(1000):
        (src / f"f{i}").write_bytes(b"%d" % i)
    img = tmp_path / "image.ifs"
    capture(str(img), str(src), "one", level=1)

    def edit(doc: dict[str, Any]) -> None:
        first = doc["indices"][0]
        doc["indices"] = [dict(first, name=f"i{i}", history=[]) for i in range(50_000)]
    republish(img, edit)
    r = run_cli("verify", img, "--json", timeout=60)
    assert r.code == 0, str(r)
    report = json.loads(r.stdout)
    assert report["indices"] == 50_000 and report["ok"]


def test_many_indices_sharing_a_damaged_root(good_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)

    def edit(doc: dict[str, Any]) -> None:
        first = dict(doc["indices"][0], files=doc["indices"][0]["files"] + 1)
        doc["indices"] = [dict(first, name=f"i{i}", history=[]) for i in range(3)]
    republish(img, edit)
    r = run_cli("verify", img, "--json")
    assert r.code == 1, str(r)
    problems = json.loads(r.stdout)["problems"]
    assert [p["indices"] for p in problems] == [[1], [2], [3]], problems


def test_a_table_segment_listed_again(good_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    republish(img, lambda doc: doc.update(tables=doc["tables"] * 20_000))
    for args in (["verify", img], ["info", img], ["cat", img, "1", "/victim"]):
        start = time.monotonic()
        line = assert_clear_failure(run_cli(*args), (4,))
        assert "listed twice" in line, line
        assert time.monotonic() - start < 20


# ---- 7. verify checks both slots, and sees a rollback --------------------------------------


def test_standby_slot_outside_the_file(good_image: Path, tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    gen, off, length, csum = current_slot(img)
    write_slot(img, (gen - 1) % 2, gen - 1, 1 << 50, length, csum)
    assert run_cli("info", img).code == 0  # readers use the current slot, as before
    r = run_cli("verify", img)
    assert r.code == 1, str(r)
    assert f"root slot {'AB'[(gen - 1) % 2]} (generation {gen - 1}, standby)" in \
        r.stdout.decode(), r.stdout.decode()


def test_rolled_back_generation(good_image: Path, tmp_path: Path) -> None:
    """The current slot's generation rewritten below the standby's (checksum fixed): every
    reader now selects the older commit and index 2 disappears; verify says so."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    gen, off, length, csum = current_slot(img)
    write_slot(img, gen % 2, gen - 2, off, length, csum)
    r = run_cli("info", img, "--json")
    assert r.code == 0 and len(json.loads(r.stdout)["indices"]) == 1
    r = run_cli("verify", img)
    assert r.code == 1, str(r)
    out = r.stdout.decode()
    assert "does not match its root slot" in out, out
    assert f"NOTE: a valid commit of generation {gen}" in out, out


def test_erased_current_slot(good_image: Path, tmp_path: Path) -> None:
    """From generation 2 on both slots hold a generation: an empty one was erased (here
    the current one, of generation 3, which a crash cannot empty)."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    republish(img)
    gen = current_slot(img)[0]
    assert gen == 3
    with open(img, "r+b") as fh:
        os.pwrite(fh.fileno(), bytes(F.SLOT_SIZE), F.SLOT_OFFSETS[gen % 2])
    r = run_cli("verify", img)
    assert r.code == 1, str(r)
    assert "is empty, though the file is at generation" in r.stdout.decode()


# ---- 8. exit codes and words ---------------------------------------------------------------


def test_damaged_version_is_damage_not_a_newer_format(good_image: Path, tmp_path: Path
                                                      ) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(good_image, img)
    write_header(img, fix_check=False, version=7)  # the check left stale: damage
    line = assert_clear_failure(run_cli("info", img), (4,))
    assert "checksum mismatch in the file header" in line, line


def test_xattr_the_destination_cannot_hold(tmp_path: Path) -> None:
    img = crafted_record(tmp_path, lambda cr: node(
        F.REG, xattrs=[(b"user.big", b"x" * F.MAX_XATTR_VALUE)]))
    r = run_cli("apply", img, "2", tmp_path / "apply")
    line = assert_clear_failure(r, (7,))
    assert "cannot hold xattr user.big (65536 bytes)" in line, line
    assert "no space" not in line, line


def test_a_fifo_named_as_image(good_image: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["info", fifo], ["verify", fifo], ["ls", fifo, "1"]):
        line = assert_clear_failure(run_cli(*args, timeout=10), (4,))
        assert "a FIFO, not a regular file" in line, line
    r = run_cli("export", good_image, "1", fifo, timeout=10)  # DEST: never opened to read
    line = assert_clear_failure(r, (7,))
    assert "exists and is not an imagefs image" in line, line


# ---- path arguments on the host: resolved as the system resolves them ---------------------


def test_host_paths_with_dotdot(good_image: Path, tmp_path: Path) -> None:
    """Paths on the host (capture's SOURCE, apply's DEST, export's DEST, mount's folder)
    have no root to stay inside: `..` in them means what it means to the system, and the
    work lands exactly there and nowhere else.  (Paths inside an image refuse `..`, above;
    a NUL byte cannot reach the CLI through argv, and the daemon refuses it.)"""
    work = tmp_path / "w"
    (work / "sub").mkdir(parents=True)
    (work / "src").mkdir()
    (work / "src" / "f").write_text("f\n")
    via = work / "sub" / ".."
    img = tmp_path / "new.ifs"
    assert run_cli("capture", via / "src", img, "--name", "x").code == 0
    assert run_cli("apply", img, "1", via / "applied").code == 0
    assert (work / "applied" / "f").read_text() == "f\n"
    assert run_cli("export", good_image, "1", via / "out.ifs", "--level", "1").code == 0
    assert (work / "out.ifs").is_file()
    (work / "mnt").mkdir()
    with mounted(img, "1", via / "mnt") as rec:
        assert (work / "mnt" / "f").read_text() == "f\n"
        assert rec["mountpoint"] == str(work / "mnt")
    assert sorted(p.name for p in work.iterdir()) == ["applied", "mnt", "out.ifs", "src",
                                                      "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.ifs", "w"]


def test_an_error_is_one_line_whatever_the_names(good_image: Path) -> None:
    """Names in messages (from the command line, or a crafted image's directories) may hold
    newlines and other control characters: they are shown escaped, so the error stays one
    line."""
    line = assert_clear_failure(run_cli("cat", good_image, "1", "/no\nsuch\x01file"), (3,))
    assert line.endswith("/no\\nsuch\\x01file"), line
