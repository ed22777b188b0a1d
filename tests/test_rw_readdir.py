"""Writable mounts: reading a directory while another process removes its entries
(issue 12, finding 9).

A reader lists part of a directory, another process removes most of its entries (the
kernel then forgets their inodes), and the reader finishes the listing.  As on ext4 and
fuse-overlayfs, the listing must end without an error, return no name twice, return every
name that existed throughout, and return nothing that never existed; the mount's log must
not blame the image.  Both for a directory created in the session (its inodes numbered
from staging.NEW_INO_BASE) and for a directory of the base index, with the fast paths
(_fuseshim) on and off.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import mounted_rw, run_imagefs

from imagefs.mount.tree import Refusal
from imagefs.session import lifecycle as sessions
from imagefs.session.staging import NEW_INO_BASE
from imagefs.session.tree import SessionTree

FILES = 3000
REMOVED = 2500
READ_FIRST = 500
BAD_LOG = ("damaged or hostile image", "I/O error", "unexpected error", "Traceback")


def _names() -> list[str]:
    return [f"f{i:05d}" for i in range(FILES)]


def _removed(names: list[str]) -> list[str]:
    """REMOVED of the names, spread over the whole listing: every sixth one is kept."""
    out = [n for i, n in enumerate(names) if i % 6 != 0]
    assert len(out) == REMOVED
    return out


@pytest.fixture
def base_with_big_dir(tmp_path: Path) -> Path:
    """An image whose index 1 holds /big with FILES small files and a file at the top."""
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    (src / "top").write_bytes(b"top\n")
    for name in _names():
        (src / "big" / name).write_bytes(name.encode())
    image = tmp_path / "base.imagefs"
    run_imagefs("capture", src, image, "--name", "base", "--level", "1")
    return image


def _log_text(rec: dict) -> str:
    try:
        return Path(rec["log"]).read_text(errors="replace")
    except (KeyError, OSError):
        return ""


@pytest.mark.parametrize("fast_paths", ["on", "off"])
@pytest.mark.parametrize("where", ["session", "base"])
def test_readdir_while_another_process_removes_entries(
        base_with_big_dir: Path, tmp_path: Path, where: str, fast_paths: str) -> None:
    mnt = tmp_path / "mnt"
    env = {"IMAGEFS_NO_FAST_PATHS": "1"} if fast_paths == "off" else None
    names = _names()
    removed = _removed(names)
    kept = sorted(set(names) - set(removed))
    with mounted_rw(base_with_big_dir, 1, mnt, env=env) as rec:
        if where == "session":
            d = mnt / "new"
            d.mkdir()
            for name in names:  # created in this session: numbered from NEW_INO_BASE
                (d / name).write_bytes(name.encode())
        else:
            d = mnt / "big"
            for name in names[:50]:  # the kernel holds some of the base inodes
                assert (d / name).read_bytes() == name.encode()
        listing_file = tmp_path / "remove.txt"
        listing_file.write_text("\n".join(removed))

        seen: list[str] = []
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                if len(seen) == READ_FIRST:
                    break
            assert len(seen) == READ_FIRST
            # Another process removes them (the kernel forgets their inodes).
            subprocess.run(
                [sys.executable, "-c",
                 "import os, sys\n"
                 "d, names = sys.argv[1], open(sys.argv[2]).read().split()\n"
                 "for n in names: os.unlink(os.path.join(d, n))\n",
                 str(d), str(listing_file)],
                check=True, timeout=120)
            try:
                seen.extend(entry.name for entry in it)  # finish the listing
            except OSError as e:
                pytest.fail(f"readdir failed after {len(seen)} entries: "
                            f"{errno.errorcode.get(e.errno or 0, e.errno)} {e}\n"
                            f"mount log:\n{_log_text(rec)[-3000:]}")

        assert len(seen) == len(set(seen)), "a name was returned twice"
        stray = set(seen) - set(names)
        assert not stray, f"names that never existed: {sorted(stray)[:10]}"
        now = sorted(os.listdir(d))
        assert now == kept
        missing = set(kept) - set(seen)
        assert not missing, f"names that existed throughout but were not returned: " \
                            f"{sorted(missing)[:10]}"
        for name in seen:  # each returned name still exists or was removed
            assert name in kept or name in set(removed)
        # A fresh listing with attributes (readdirplus) after the removals is right too.
        assert sorted(e.name for e in os.scandir(d)
                      if e.stat(follow_symlinks=False).st_size == len(e.name)) == kept
        time.sleep(0.3)  # a damage report is logged from a background task
        log = _log_text(rec)
        for bad in BAD_LOG:
            assert bad not in log, f"the mount's log says {bad!r}:\n{log[-3000:]}"


def test_rewinddir_lists_the_directory_as_it_is_then(base_with_big_dir: Path,
                                                      tmp_path: Path) -> None:
    """rewinddir (offset 0 again) refers to the directory's present state, as opendir
    would: names removed since are gone, names created since are there."""
    mnt = tmp_path / "mnt"
    with mounted_rw(base_with_big_dir, 1, mnt) as rec:
        d = mnt / "new"
        d.mkdir()
        for i in range(100):
            (d / f"a{i:03d}").write_bytes(b"x")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert sorted(os.listdir(fd)) == [f"a{i:03d}" for i in range(100)]
            subprocess.run(["rm", "-f", *(str(d / f"a{i:03d}") for i in range(0, 100, 2))],
                           check=True)
            (d / "b").write_bytes(b"y")
            # os.listdir(fd) reads through a dup of fd from where it stands: rewound here.
            os.lseek(fd, 0, os.SEEK_SET)
            assert sorted(os.listdir(fd)) == [f"a{i:03d}" for i in range(1, 100, 2)] + ["b"]
        finally:
            os.close(fd)
        log = _log_text(rec)
        for bad in BAD_LOG:
            assert bad not in log, f"the mount's log says {bad!r}:\n{log[-3000:]}"


def test_a_session_inode_number_is_never_read_as_a_base_record(
        base_with_big_dir: Path, tmp_path: Path) -> None:
    """Once a session-created inode is gone (removed, forgotten), its number is an
    unknown inode (ENOENT), not the address of a base record to decode (EIO)."""
    session = sessions.Session.create(str(base_with_big_dir), "1", str(tmp_path / "nowhere"))
    try:
        tree: SessionTree = session.tree
        node = tree.make(1, b"gone", 0o100644, 0, 0)
        ino = node.ino
        assert ino >= NEW_INO_BASE
        tree.remember(ino, 1)
        tree.unlink(1, b"gone")
        assert tree.attrs(ino).nlink == 0  # still held by the kernel
        tree.forget(ino, 1)
        assert ino not in tree.nodes
        for call in (lambda: tree.attrs(ino), lambda: tree.xattrs(ino),
                     lambda: tree.read(ino, 0, 10), lambda: tree.seek(ino, 0, os.SEEK_DATA),
                     lambda: tree.setattr(ino, mode=0o600),
                     lambda: tree.set_xattr(ino, b"user.x", b"1")):
            with pytest.raises(Refusal) as caught:
                call()
            assert caught.value.errno == errno.ENOENT
        with pytest.raises(Refusal) as caught:
            tree.attrs(ino + 12345)  # a session number never handed out
        assert caught.value.errno == errno.ENOENT
    finally:
        session.close()
        sessions.discard(session.info)
