"""Read-only mounts fill the kernel's page cache ahead (imagefs/mount/prefill.py, issue 17).

Once a pack is decompressed for one file, the other files in it that the kernel knows are
put in its page cache, so reading them asks the mount nothing.  What is stored must be
exactly the file (every chunk checked), never unchecked bytes; a file never listed or
looked up is not stored; and reading one file still decompresses one pack."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import re
import time
from pathlib import Path

import pytest
from conftest import mounted, run_imagefs, wait_until
from test_hostile import Crafter, ino, make_crafted
from test_mount import mount_log

from imagefs.format import layout as F
from imagefs.format.packs import ChunkLoc
from imagefs.format.writer import PendingInode as Node

PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def resident(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore), without reading it:
    the mapping is made but never touched, so the mount gets no request for it."""
    size = path.stat().st_size
    pages = -(-size // PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def all_resident(path: Path) -> bool:
    return resident(path) == -(-path.stat().st_size // PAGE)


def reads_served(rec: dict) -> int:
    """READ requests the mount answered (its last log line, after unmount)."""
    m = re.search(r"requests \d+: [^;]*?(\d+) read\b", mount_log(rec))
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One directory of 40 small files (one pack) and another directory of 40."""
    base = tmp_path_factory.mktemp("prefill")
    src = base / "src"
    rng = random.Random(17)
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for i in range(40):
            (src / d / f"f{i:02}").write_bytes(rng.randbytes(rng.randrange(1, 9000)))
    image = base / "small.imagefs"
    run_imagefs("capture", src, image, "--name", "small")
    return src, image


def test_files_beside_a_read_one_are_in_the_page_cache_before_they_are_read(
        small_files: tuple[Path, Path], tmp_path: Path) -> None:
    src, image = small_files
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        names = sorted(os.listdir(mnt / "a"))  # READDIRPLUS: the kernel knows them now
        assert not any(resident(mnt / "a" / n) for n in names)
        assert (mnt / "a" / names[0]).read_bytes() == (src / "a" / names[0]).read_bytes()
        assert wait_until(lambda: all(all_resident(mnt / "a" / n) for n in names), 10), \
            [n for n in names if not all_resident(mnt / "a" / n)]
        for n in names:
            assert (mnt / "a" / n).read_bytes() == (src / "a" / n).read_bytes(), n
    assert reads_served(rec) == 1, mount_log(rec)
    assert "40 files put in the page cache ahead" in mount_log(rec)


def test_reading_one_file_decompresses_one_pack_and_stores_only_known_files(
        small_files: tuple[Path, Path], tmp_path: Path) -> None:
    src, image = small_files
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        target = mnt / "a" / "f07"  # looked up by path: only a, a/f07 become known
        assert target.read_bytes() == (src / "a" / "f07").read_bytes()
    log = mount_log(rec)
    assert "(1 pack decompressions)" in log, log
    assert "1 files put in the page cache ahead" in log, log


def test_off_with_the_environment_switch(small_files: tuple[Path, Path],
                                         tmp_path: Path) -> None:
    src, image = small_files
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt, "--no-daemon", env={"IMAGEFS_NO_PREFILL": "1"}) as rec:
        for n in sorted(os.listdir(mnt / "a")):
            assert (mnt / "a" / n).read_bytes() == (src / "a" / n).read_bytes()
    assert reads_served(rec) == 40, mount_log(rec)
    assert "page cache ahead" not in mount_log(rec)


def _wrong_hash(cr: Crafter) -> Node:
    """A file whose one chunk lies in the same pack as "ok" but whose recorded xxh3 is not
    its content's: stored unchecked, its bytes would be served."""
    loc = cr.packs.add_chunk(b"unchecked" * 500)
    cr.seal()
    n = Node(ino(F.REG, 4500))
    n.locs = [(0, ChunkLoc(loc.pack_id(), loc.offset, 4500, bytes(16), bytes(32)))]
    return n


def test_a_damaged_file_is_never_put_in_the_page_cache(tmp_path: Path) -> None:
    def build(cr: Crafter) -> Node:
        ok = cr.file(b"fine\n" * 100)
        return cr.dir([(b"ok", ok), (b"victim", _wrong_hash(cr))])

    image = make_crafted(tmp_path, build)
    mnt = tmp_path / "mnt"
    with mounted(image, 2, mnt):
        assert sorted(os.listdir(mnt)) == ["ok", "victim"]
        assert (mnt / "ok").read_bytes() == b"fine\n" * 100  # the pack is now cached
        time.sleep(0.5)  # time enough for the filler to have stored it, were it to
        assert resident(mnt / "victim") == 0
        with pytest.raises(OSError) as err:
            (mnt / "victim").read_bytes()
        assert err.value.errno == 5  # EIO, never the unchecked bytes
