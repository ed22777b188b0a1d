"""The inode layer a mount serves (imagefs.mount.tree), tested without mounting: numbering,
lookups, listings in pages, holes, st_blocks, reads across holes and chunks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import run_imagefs
from treegen import BIG_SPARSE_DATA, BIG_SPARSE_SIZE, EVERY_TYPE, SMALL_SPARSE_SIZE

from imagefs import Image
from imagefs.format import layout as F
from imagefs.mount.tree import ROOT_INO, IndexTree, Refusal, data_regions


@pytest.fixture(scope="module")
def tree(every_type_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    image = tmp_path_factory.mktemp("vfs") / "t.imagefs"
    run_imagefs("capture", every_type_tree, image, "--name", "t")
    img = Image.open(str(image))
    yield IndexTree(img.view(1), inode_cache_weight=50)
    img.close()


def walk_to(tree: IndexTree, rel: bytes) -> int:
    ino = ROOT_INO
    for part in rel.split(b"/"):
        hit = tree.lookup(ino, part)
        assert hit is not None, rel
        ino = hit[0]
    return ino


def test_root_is_inode_one_and_numbers_are_stable(tree: IndexTree) -> None:
    assert tree.inode(ROOT_INO).kind == F.DIR
    assert tree.ino_of(tree.root_ref) == ROOT_INO and tree.ref_of(ROOT_INO) == tree.root_ref
    a = walk_to(tree, EVERY_TYPE["regular"])
    assert a != ROOT_INO and walk_to(tree, EVERY_TYPE["regular"]) == a
    links = {walk_to(tree, p) for p in EVERY_TYPE["hardlink"]}
    assert len(links) == 1, "hardlinks are one inode"


def test_lookup_misses_and_not_a_directory(tree: IndexTree) -> None:
    assert tree.lookup(ROOT_INO, b"no-such") is None
    f = walk_to(tree, EVERY_TYPE["regular"])
    with pytest.raises(Refusal) as e:
        tree.lookup(f, b"x")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(Refusal):
        list(tree.entries(f))
    with pytest.raises(Refusal) as e:
        tree.readlink(f)
    assert e.value.errno == errno.EINVAL


def test_entries_resume_at_next_id(tree: IndexTree) -> None:
    names_dir = walk_to(tree, EVERY_TYPE["names_dir"])
    whole = [(n, i) for n, i, _node, _next in tree.entries(names_dir)]
    assert [n for n, _ in whole] == sorted(n for n, _ in whole)
    paged = []
    start = 0
    while True:
        page = list(tree.entries(names_dir, start))[:3]
        if not page:
            break
        paged.extend((n, i) for n, i, _node, _next in page)
        start = page[-1][3]
    assert paged == whole


def test_holes_and_blocks_of_the_big_sparse_file(tree: IndexTree) -> None:
    ino = walk_to(tree, EVERY_TYPE["big_sparse"])
    node = tree.inode(ino)
    assert node.size == BIG_SPARSE_SIZE
    assert list(data_regions(node)) == [(o, o + n) for o, n in BIG_SPARSE_DATA]
    assert tree.blocks(node) == sum(n for _o, n in BIG_SPARSE_DATA) // 512
    first, second, third = BIG_SPARSE_DATA
    assert tree.seek(ino, 0, os.SEEK_DATA) == 0
    assert tree.seek(ino, 0, os.SEEK_HOLE) == first[1]
    assert tree.seek(ino, first[1], os.SEEK_DATA) == second[0]
    assert tree.seek(ino, third[0] + 1, os.SEEK_HOLE) == third[0] + third[1]
    with pytest.raises(Refusal) as e:
        tree.seek(ino, third[0] + third[1], os.SEEK_DATA)  # only a hole is left
    assert e.value.errno == errno.ENXIO
    with pytest.raises(Refusal) as e:
        tree.seek(ino, BIG_SPARSE_SIZE, os.SEEK_HOLE)
    assert e.value.errno == errno.ENXIO
    # a read across a hole and into data
    data = tree.view.read(node, second[0] - 10, 20)
    assert data[:10] == bytes(10) and data[10:] != bytes(10)


def test_read_matches_the_file(tree: IndexTree, every_type_tree: Path) -> None:
    for key in ("random3m", "small_sparse", "regular", "empty"):
        rel = EVERY_TYPE[key]
        node = tree.inode(walk_to(tree, rel))
        with open(os.path.join(os.fsencode(every_type_tree), rel), "rb") as fh:
            want = fh.read()
        got = b"".join(tree.view.read(node, off, 100_000) for off in range(0, node.size, 100_000))
        assert got == want, rel
        assert tree.view.read(node, node.size, 10) == b""
    assert tree.inode(walk_to(tree, EVERY_TYPE["small_sparse"])).size == SMALL_SPARSE_SIZE


def test_xattrs_and_path_of(tree: IndexTree) -> None:
    ino = walk_to(tree, EVERY_TYPE["capability"])
    assert b"security.capability" in tree.xattr_names(ino)
    assert tree.xattr(ino, b"security.capability")
    assert tree.xattr(ino, b"user.none") is None
    assert tree.path_of(ino) == b"/" + EVERY_TYPE["capability"]
    assert tree.path_of(ROOT_INO) == b"/"
    u = tree.usage()
    assert u.files > 0 and u.blocks > 0

