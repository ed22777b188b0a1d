"""Fidelity: what goes in comes back out, byte for byte and attribute for attribute.

The oracle is rsync (conftest.rsync_diff, nanosecond mtimes): capture a tree, apply it
somewhere else, and rsync must find nothing to do.  Also `cat`, `extract`, `ls` on the
awkward cases (holes, devices, raw non-UTF-8 and newline names), and export round trips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import (
    assert_same_tree,
    data_regions,
    fixture_tree,
    rsync_diff,
    run_imagefs,
)
from treegen import (
    BIG_SPARSE_DATA,
    BIG_SPARSE_SIZE,
    EVERY_TYPE,
    NAMES_IN_NAMES_DIR,
    SMALL_SPARSE_DATA,
    SMALL_SPARSE_SIZE,
    sparse_pattern,
)

import imagefs
from imagefs.apply import Applier
from imagefs.format import layout as F

SPARSE = (EVERY_TYPE["big_sparse"],)
DESCRIPTION = "every kind of inode — devices, holes, ACLs, caps"


def b(path: Path | str) -> bytes:
    return os.fsencode(path)


def slurp(path: bytes) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def info_json(image: Path | str) -> dict:
    return json.loads(run_imagefs("info", image, "--json").stdout)


def verify_ok(image: Path | str) -> None:
    doc = json.loads(run_imagefs("verify", image, "--json").stdout)
    assert doc["ok"] is True, doc["problems"]


def entry_meta(path: bytes, nlink: bool = False) -> dict:
    """Everything a restore must keep about one entry (content of small files included)."""
    st = os.lstat(path)
    doc = {
        "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
        "xattrs": {n: os.getxattr(path, n, follow_symlinks=False)
                   for n in sorted(os.listxattr(path, follow_symlinks=False))},
    }
    if nlink:
        doc["nlink"] = st.st_nlink
    if stat.S_ISREG(st.st_mode):
        doc["size"] = st.st_size
        if st.st_size < 64 << 20:
            with open(path, "rb") as fh:
                doc["content"] = fh.read()
    elif stat.S_ISLNK(st.st_mode):
        doc["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        doc["rdev"] = st.st_rdev
    return doc


# ---- the every-type tree -------------------------------------------------------------------

@pytest.fixture(scope="module")
def every_image(every_type_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = tmp_path_factory.mktemp("fidelity") / "every.imagefs"
    out = run_imagefs("capture", every_type_tree, image, "--name", "every",
                      "--description", DESCRIPTION)
    assert out.stdout.strip() == b"1"
    return image


@pytest.fixture(scope="module")
def every_applied(every_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("applied") / "root"
    run_imagefs("apply", every_image, "1", dest)
    return dest


def test_every_type_roundtrip_cli(every_type_tree: Path, every_image: Path,
                                  every_applied: Path) -> None:
    assert_same_tree(every_type_tree, every_applied, sparse_files=SPARSE)
    verify_ok(every_image)


def test_every_type_roundtrip_api(every_type_tree: Path, tmp_path: Path) -> None:
    image = tmp_path / "api.imagefs"
    r = imagefs.capture(str(image), str(every_type_tree), "every", "via the API", level=3)
    assert (r.index, r.name) == (1, "every")
    dest = tmp_path / "out"
    with imagefs.Image.open(str(image)) as img:
        view = img.view("every")
        assert view.entry.description == "via the API"
        Applier(view).apply(str(dest))
    assert_same_tree(every_type_tree, dest, sparse_files=SPARSE)


def test_apply_onto_existing_tree_replaces_entries(every_type_tree: Path, every_image: Path,
                                                   tmp_path: Path) -> None:
    """Applying twice onto the same folder (entries already there) still gives the tree."""
    dest = tmp_path / "twice"
    run_imagefs("apply", every_image, "1", dest)
    run_imagefs("apply", every_image, "every", dest)
    assert_same_tree(every_type_tree, dest, sparse_files=SPARSE)


def test_counts_in_info(every_type_tree: Path, every_image: Path) -> None:
    doc = info_json(every_image)
    (entry,) = doc["indices"]
    assert entry["index"] == 1
    assert entry["name"] == "every"
    assert entry["description"] == DESCRIPTION
    files = dirs = nbytes = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(b(every_type_tree)):
        dirs += len([d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))])
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            files += 1
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                nbytes += st.st_size
    assert entry["files"] == files
    assert entry["dirs"] in (dirs, dirs + 1)  # with or without the root itself
    assert entry["bytes"] == nbytes


def test_rsync_oracle_sees_each_kind_of_difference(every_type_tree: Path,
                                                   every_applied: Path,
                                                   tmp_path: Path) -> None:
    """The oracle is only worth something if it is not blind: damage a copy of the applied
    tree in one way at a time and check rsync_diff reports each."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", f"{every_applied}/.", str(copy)], check=True)
    # cp -a does not keep the big sparse file's holes cheaply otherwise; fine either way.
    assert_same_tree(every_type_tree, copy, sparse_files=SPARSE)
    c = b(copy)
    E = EVERY_TYPE

    def p(rel: bytes) -> bytes:
        return c + b"/" + rel

    def keep_times(path: bytes):
        st = os.lstat(path)
        return lambda: os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns),
                                follow_symlinks=False)

    damages = []

    def damage(label, fn, *restore_times):
        damages.append((label, fn, restore_times))

    damage("capability", lambda: subprocess.run(["setcap", "-r", p(E["capability"])],
                                                check=True), E["capability"])
    damage("acl", lambda: subprocess.run(["setfacl", "-m", "u:1234:r", p(E["acl_file"])],
                                         check=True), E["acl_file"])
    damage("default acl", lambda: subprocess.run(["setfacl", "-k", p(E["acl_dir"])],
                                                 check=True), E["acl_dir"])
    damage("symlink mtime ns", lambda: os.utime(
        p(E["rel_symlink"]), ns=(0, os.lstat(p(E["rel_symlink"])).st_mtime_ns + 1),
        follow_symlinks=False))
    damage("file mtime ns", lambda: os.utime(
        p(E["regular"]), ns=(0, os.lstat(p(E["regular"])).st_mtime_ns + 1)))
    damage("trusted xattr on symlink", lambda: os.removexattr(
        p(E["xattr_symlink"]), b"trusted.on-a-link", follow_symlinks=False),
        E["xattr_symlink"])
    damage("symlink owner", lambda: os.chown(p(E["owner_symlink"]), 1, 1,
                                             follow_symlinks=False), E["owner_symlink"])
    damage("setuid bit", lambda: os.chmod(p(E["setuid"]), 0o755), E["setuid"])
    def other_device() -> None:
        os.unlink(p(E["chardev"]))
        os.mknod(p(E["chardev"]), 0o666 | stat.S_IFCHR, os.makedev(1, 5))
        os.setxattr(p(E["chardev"]), b"trusted.on-a-device", b"c")
    damage("device number", other_device, E["chardev"], b"dev")
    damage("content, same size and mtime", lambda: _flip_byte(p(E["random3m"])),
           E["random3m"])

    def break_hardlink() -> None:
        target = p(E["hardlink"][1])
        data = slurp(target)
        os.unlink(target)
        with open(target, "wb") as fh:
            fh.write(data)
        shutil.copystat(p(E["hardlink"][0]), target, follow_symlinks=False)
        st = os.lstat(p(E["hardlink"][0]))
        os.chown(target, st.st_uid, st.st_gid)
    damage("hardlink", break_hardlink, os.path.dirname(E["hardlink"][1]))

    for label, fn, restore in damages:
        work = tmp_path / f"damaged-{label.replace(' ', '-')}"
        subprocess.run(["cp", "-a", f"{copy}/.", str(work)], check=True)
        c = b(work)
        restorers = [keep_times(p(r)) for r in restore]
        fn()
        for r in restorers:
            r()
        found = rsync_diff(every_type_tree, work,
                           extra=[f"--exclude=/{os.fsdecode(s)}" for s in SPARSE])
        assert found.strip(), f"rsync_diff did not notice: {label}"
        shutil.rmtree(work)


def _flip_byte(path: bytes) -> None:
    st = os.lstat(path)
    with open(path, "r+b") as fh:
        fh.seek(12345)
        x = fh.read(1)
        fh.seek(12345)
        fh.write(bytes([x[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---- sparse files --------------------------------------------------------------------------

def test_sparse_file_keeps_its_holes(every_applied: Path, every_image: Path) -> None:
    path = b(every_applied) + b"/" + EVERY_TYPE["big_sparse"]
    st = os.stat(path)
    assert st.st_size == BIG_SPARSE_SIZE == 5 << 30
    assert st.st_blocks * 512 < 1 << 20, f"applied file uses {st.st_blocks * 512} bytes"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size  # a hole before EOF
        for off, n in BIG_SPARSE_DATA:
            assert os.lseek(fd, off, os.SEEK_DATA) == off
            assert os.pread(fd, n, off) == sparse_pattern(off, n)
            assert os.pread(fd, 4096, off + n + 8192) == bytes(4096)
        last_off, last_n = BIG_SPARSE_DATA[-1]
        with pytest.raises(OSError):  # ENXIO: the tail is a hole
            os.lseek(fd, last_off + last_n, os.SEEK_DATA)
    finally:
        os.close(fd)
    # The image stores the data regions only.
    with imagefs.Image.open(str(every_image)) as img:
        view = img.view(1)
        ino = view.lookup(b"/" + EVERY_TYPE["big_sparse"])
        assert ino.size == BIG_SPARSE_SIZE
        assert sum(e[3] for e in ino.extents) == sum(n for _o, n in BIG_SPARSE_DATA)
        assert view.read(ino, BIG_SPARSE_DATA[2][0] - 10, 20) == bytes(10) + sparse_pattern(
            BIG_SPARSE_DATA[2][0], 10)
        assert view.read(ino, BIG_SPARSE_SIZE - 5, 100) == bytes(5)


def test_small_and_all_hole_sparse_files(every_type_tree: Path, every_applied: Path) -> None:
    for rel in (EVERY_TYPE["small_sparse"], b"sparse/all-hole"):
        src = b(every_type_tree) + b"/" + rel
        dst = b(every_applied) + b"/" + rel
        assert os.stat(dst).st_size == os.stat(src).st_size
        assert data_regions(dst) == data_regions(src)
        assert os.stat(dst).st_blocks <= os.stat(src).st_blocks
    assert data_regions(b(every_applied) + b"/sparse/all-hole") == []


# ---- cat, extract, ls ------------------------------------------------------------------------

def test_cat_gives_the_bytes(every_type_tree: Path, every_image: Path) -> None:
    src = b(every_type_tree)
    for rel in (EVERY_TYPE["regular"], EVERY_TYPE["random3m"], EVERY_TYPE["empty"],
                EVERY_TYPE["hardlink"][2], EVERY_TYPE["newline"], EVERY_TYPE["non_utf8"],
                EVERY_TYPE["long"], EVERY_TYPE["mode000"], EVERY_TYPE["capability"],
                EVERY_TYPE["deep"], b"files/16KiB-plus-1", b"files/zeros-1MiB-dense"):
        out = run_imagefs("cat", every_image, "1", b"/" + rel).stdout
        assert out == slurp(src + b"/" + rel), rel
    # Holes read as zeros.
    out = run_imagefs("cat", every_image, "1", b"/" + EVERY_TYPE["small_sparse"]).stdout
    expect = bytearray(SMALL_SPARSE_SIZE)
    for off, n in SMALL_SPARSE_DATA:
        expect[off:off + n] = sparse_pattern(off, n)
    assert out == expect
    # Symlinks are followed inside the image (relative, and through a directory link).
    out = run_imagefs("cat", every_image, "1", b"/" + EVERY_TYPE["rel_symlink"]).stdout
    assert out == slurp(src + b"/" + EVERY_TYPE["regular"])
    out = run_imagefs("cat", every_image, "1", "/links/to-dir/three-thrice").stdout
    assert out == slurp(src + b"/" + EVERY_TYPE["hardlink"][0])


@pytest.mark.parametrize("rel", [b"files", EVERY_TYPE["chardev"], EVERY_TYPE["fifo"],
                                 EVERY_TYPE["dangling"], b"no/such/file"])
def test_cat_of_a_non_file_is_one_line_error(every_image: Path, rel: bytes) -> None:
    out = run_imagefs("cat", every_image, "1", b"/" + rel, check=False)
    assert out.returncode not in (0, 70), out
    assert out.stdout == b""
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: "), lines


def test_extract_keeps_bytes_and_metadata(every_type_tree: Path, every_image: Path,
                                          tmp_path: Path) -> None:
    E = EVERY_TYPE
    dest = tmp_path / "extracted"
    paths = [E["regular"], E["acl_dir"], E["capability"], E["non_utf8"], E["newline"],
             E["long"], E["hardlink"][0], E["abs_symlink"], E["dangling"], E["chardev"],
             E["blockdev"], E["fifo"], E["socket"], E["small_sparse"], E["setuid"],
             E["owner"], E["xattrs"], E["xattr_symlink"], E["deep"], E["ro_dir"]]
    run_imagefs("extract", every_image, "1", *[b"/" + p for p in paths], "--dest", dest)
    src, dst = b(every_type_tree), b(dest)
    for rel in paths:
        s, d = src + b"/" + rel, dst + b"/" + rel
        if stat.S_ISDIR(os.lstat(s).st_mode):
            diff = rsync_diff(s, d)
            assert diff == "", f"{rel!r}:\n{diff}"
        else:
            assert entry_meta(d) == entry_meta(s), rel
    # Sparse holes are kept by extract too.
    assert data_regions(dst + b"/" + E["small_sparse"]) == data_regions(
        src + b"/" + E["small_sparse"])
    # A path through a directory symlink: the image path is kept under DEST.
    run_imagefs("extract", every_image, "1", "/links/to-dir/three-thrice", "--dest", dest)
    got = dst + b"/links/to-dir/three-thrice"
    assert not os.path.islink(dst + b"/links/to-dir")
    assert entry_meta(got) == entry_meta(src + b"/" + E["hardlink"][2])
    # Nothing else appeared at the top of DEST.
    assert sorted(os.listdir(dst)) == sorted({p.split(b"/")[0] for p in paths})


def test_extract_missing_path_is_one_line_error(every_image: Path, tmp_path: Path) -> None:
    out = run_imagefs("extract", every_image, "1", "/nope", "--dest", tmp_path / "x",
                      check=False)
    assert out.returncode == 3
    assert out.stderr.decode().count("\n") == 1 and out.stderr.startswith(b"imagefs: ")


def test_ls_prints_raw_names(every_image: Path) -> None:
    out = run_imagefs("ls", every_image, "1", "/names").stdout
    assert out == b"".join(n + b"\n" for n in NAMES_IN_NAMES_DIR)
    out = run_imagefs("ls", every_image, "1", "/names", "-R").stdout
    assert out == b"/names\n" + b"".join(b"/names/" + n + b"\n" for n in NAMES_IN_NAMES_DIR)
    out = run_imagefs("ls", every_image, "1", "/names", "-l").stdout
    for name in NAMES_IN_NAMES_DIR:
        size = len(b"name: " + name + b"\n")
        assert b" %d " % size in out
        assert b" " + name + b"\n" in out, name
    assert out.count(b"-rw-r--r--") == len(NAMES_IN_NAMES_DIR)
    # A non-UTF-8 path given on the command line (bytes in argv).
    out = run_imagefs("ls", every_image, "1", b"/" + EVERY_TYPE["non_utf8"], "-l").stdout
    assert out.endswith(b"/names/caf\xe9\n") and out.startswith(b"-rw-r--r--")


def test_ls_long_shows_kinds_modes_owners_devices(every_image: Path) -> None:
    def line_of(path: str, name: bytes) -> bytes:
        out = run_imagefs("ls", every_image, "1", path, "-l").stdout
        pattern = re.compile(rb" \d\d:\d\d " + re.escape(name) + rb"( -> .*)?$")
        lines = [x for x in out.split(b"\n") if pattern.search(x)]
        assert len(lines) == 1, (name, out)
        return lines[0]

    assert line_of("/dev", b"null-like").startswith(b"crw-rw-rw-")
    assert b" 1, 3 " in line_of("/dev", b"null-like")
    assert line_of("/dev", b"loop0-like").startswith(b"brw-rw----")
    assert b" 7, 0 " in line_of("/dev", b"loop0-like")
    assert b"4095, 1048575" in line_of("/dev", b"big-numbers")
    assert line_of("/dev", b"fifo").startswith(b"prw-r-----")
    assert line_of("/dev", b"sock").startswith(b"s")
    assert line_of("/modes", b"setuid").startswith(b"-rwsr-xr-x")
    assert line_of("/modes", b"setuid-other").startswith(b"-rwsr-sr-x")
    assert line_of("/modes", b"sticky-dir").startswith(b"drwxrwxrwt")
    assert line_of("/modes", b"mode-000").startswith(b"----------")
    assert b" 1234  5678 " in line_of("/owners", b"odd")
    link = line_of("/links", b"abs")
    assert link.startswith(b"l") and link.endswith(b"abs -> /etc/hostname")
    hard = line_of("/links/a", b"three")
    assert hard.split()[1] == b"3"  # link count


def test_ls_recursive_lists_every_path(every_type_tree: Path, every_image: Path) -> None:
    out = run_imagefs("ls", every_image, "1", "/", "-R").stdout
    root = b(every_type_tree)
    expect = {b"/"}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            expect.add(os.path.join(dirpath, n)[len(root):])
    # Names with newlines make line splitting ambiguous: check each path is there.
    for p in expect:
        assert p + b"\n" in out, p
    assert out.count(b"\n") == len(expect) + sum(p.count(b"\n") for p in expect)


# ---- a real Debian slice ------------------------------------------------------------------

def test_minbase_slice_roundtrip_cli(minbase_slice: Path, tmp_path: Path) -> None:
    image = tmp_path / "slice.imagefs"
    run_imagefs("capture", minbase_slice, image, "--name", "slice", "--level", "3")
    dest = tmp_path / "applied"
    run_imagefs("apply", image, "slice", dest)
    assert_same_tree(minbase_slice, dest)
    # The journal directory's ACLs are there (rsync -A compared them; make it explicit).
    acl = subprocess.run(["getfacl", "-cp", f"{dest}/var/log/journal"], capture_output=True,
                         text=True, check=True).stdout
    src_acl = subprocess.run(["getfacl", "-cp", f"{minbase_slice}/var/log/journal"],
                             capture_output=True, text=True, check=True).stdout
    assert acl == src_acl and "default:" in acl
    verify_ok(image)


# ---- export ---------------------------------------------------------------------------------

def test_export_then_apply_is_equal(every_type_tree: Path, minbase_slice: Path,
                                    every_image: Path, tmp_path: Path) -> None:
    two = tmp_path / "two.imagefs"
    shutil.copyfile(every_image, two)
    run_imagefs("capture", minbase_slice, two, "--name", "slice", "--description",
                "etc, usr/bin, doc, var/log, dev of minbase", "--level", "3")
    before = {e["name"]: e for e in info_json(two)["indices"]}

    # One index, chosen by number.
    one = tmp_path / "one.imagefs"
    run_imagefs("export", two, "1", one, "--level", "3")
    # Both, in the other order, by name and number.
    both = tmp_path / "both.imagefs"
    doc = json.loads(run_imagefs("export", two, "slice,1", both, "--json", "--level", "1")
                     .stdout)
    assert doc["indices"] == [1, 2]

    for exported, names in ((one, ["every"]), (both, ["slice", "every"])):
        verify_ok(exported)
        after = info_json(exported)["indices"]
        assert [e["name"] for e in after] == names
        for e in after:
            src = before[e["name"]]
            for key in ("name", "description", "digest", "created", "files", "dirs",
                        "bytes"):
                assert e[key] == src[key], (exported.name, key)
    dest = tmp_path / "from-export"
    run_imagefs("apply", one, "every", dest)
    assert_same_tree(every_type_tree, dest, sparse_files=SPARSE)
    dest = tmp_path / "slice-from-export"
    run_imagefs("apply", both, "1", dest)
    assert_same_tree(minbase_slice, dest)
    # The single-index export holds only what that index references.
    assert one.stat().st_size < two.stat().st_size * 0.6


# ---- whole fixture trees (slow) ---------------------------------------------------------

@pytest.mark.slow
def test_whole_fixture_trees_roundtrip(tmp_path: Path) -> None:
    image = tmp_path / "debian.imagefs"
    trees = {"bookworm-minbase": fixture_tree("bookworm-minbase"),
             "bookworm-web": fixture_tree("bookworm-web")}
    for name, tree in trees.items():
        run_imagefs("capture", tree, image, "--name", name)
    verify_ok(image)
    for n, tree in enumerate(trees.values(), 1):
        dest = tmp_path / f"applied-{n}"
        run_imagefs("apply", image, str(n), dest)
        assert_same_tree(tree, dest)
        shutil.rmtree(dest)
    assert {e["name"] for e in info_json(image)["indices"]} == set(trees)


def test_kinds_in_image_match_source(every_image: Path) -> None:
    """The records carry the right kind for each special file (not just the mode)."""
    with imagefs.Image.open(str(every_image)) as img:
        view = img.view(1)
        kinds = {rel: view.lookup(b"/" + EVERY_TYPE[rel], follow=False).kind
                 for rel in ("chardev", "blockdev", "fifo", "socket", "abs_symlink",
                             "dangling", "regular", "names_dir")}
    assert kinds == {"chardev": F.CHR, "blockdev": F.BLK, "fifo": F.FIFO,
                     "socket": F.SOCK, "abs_symlink": F.LNK, "dangling": F.LNK,
                     "regular": F.REG, "names_dir": F.DIR}


def test_verify_accepts_hardlinks_across_directories(tmp_path: Path) -> None:
    """A file hardlinked from a directory that the walk reaches after the file's first
    name must not make verify report a digest mismatch (imagefs/verify.py computed
    digests in reversed walk order, which is not bottom-up across hardlinks)."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b" / "c").mkdir(parents=True)
    (src / "a" / "file").write_bytes(b"linked\n")
    os.link(src / "a" / "file", src / "b" / "c" / "again")
    image = tmp_path / "links.imagefs"
    run_imagefs("capture", src, image, "--name", "links")
    verify_ok(image)
    dest = tmp_path / "out"
    run_imagefs("apply", image, "1", dest)
    assert_same_tree(src, dest)
