"""imagefs health scan | check | restore on a real Debian root (bookworm-minbase): damage
made in a writable session (a package file deleted, one overwritten, a conffile edited) is
found exactly, as the host's `dpkg --root=MNT --verify` and `--audit` on a mount find it
(the oracles); restore puts the files back from another index (storing no new content) or
from the package's .deb, and what it cannot put back it lists, with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    copy_image,
    fixture_tree,
    kernel_imagefs_mounts,
    mounted,
    mounted_rw,
    run_imagefs,
)
from servicing_helpers import DEBS, NEEDS_DEBS, NEEDS_NSPAWN, sha

from imagefs.places import run_dir
from imagefs.verify import verify, verify_index
from servicing.health import record_path
from servicing.health_scan import parse_audit, parse_verify
from servicing.runner import run

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

TREE_DEB = "tree_2.1.0-1_amd64.deb"
DAMAGED = {"/usr/bin/nl": "content differs", "/usr/bin/xargs": "missing"}
OWNERS = {"/usr/bin/nl": ["coreutils"], "/usr/bin/xargs": ["findutils"],
          "/etc/adduser.conf": ["adduser"]}


def workspace_mounts() -> list[str]:
    """Mounts in this test session's servicing workspaces (not another run's)."""
    return [m for m in kernel_imagefs_mounts() if m.startswith(f"{run_dir()}/servicing/")]


@pytest.fixture(scope="module")
def image(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase as index 1 (minbase, pristine: a copy of the session's capture)
    and, committed from a writable session of it, index 2 (damaged): /usr/bin/xargs
    deleted, /usr/bin/nl overwritten, /etc/adduser.conf edited.  Shared: tests that change
    it work on a copy."""
    work = tmp_path_factory.mktemp("health")
    path = copy_image(minbase_image, work / "minbase.imagefs")
    mnt = work / "rw"
    with mounted_rw(path, "1", mnt):
        os.unlink(mnt / "usr/bin/xargs")
        (mnt / "usr/bin/nl").write_bytes(b"#!/bin/sh\necho damaged\n")
        with open(mnt / "etc/adduser.conf", "a") as fh:
            fh.write("# changed by the admin\n")
        run_imagefs("commit", mnt, "--new-index", "damaged")
    return path


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--reflink=auto", str(src), str(dst)], check=True)
    return dst




def health(*args: object, code: int | None = None) -> dict:
    """`imagefs health ARGS --json`: its document; its exit code checked when given."""
    proc = run_imagefs("health", *args, "--json", check=False)
    assert code is None or proc.returncode == code, (proc.returncode, proc.stderr.decode())
    return json.loads(proc.stdout)


def info(path: Path) -> dict:
    return json.loads(run_imagefs("info", path, "--json", "--history").stdout)


def files(findings: list[dict]) -> dict[str, str]:
    return {f["path"]: f["problem"] for f in findings}


def as_dpkg_lines(doc: dict) -> set[str]:
    """A scan's package findings as the lines dpkg --verify prints."""
    pk = doc["packages"]
    return {f"{f['detail']:<9} {'c' if f['conffile'] else ' '} {f['path']}"
            for f in pk["damaged"] + pk["drift"]}


def host_dpkg(mnt: Path, action: str) -> str:
    """The oracle: the host's dpkg on a mount (exits 0 whatever it finds)."""
    out = subprocess.run(["dpkg", f"--root={mnt}", action], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_scan_finds_exactly_the_damage_as_dpkg_does(image: Path, tmp_path: Path) -> None:
    before = sha(image)
    record = Path(record_path(_uuid(image), "damaged"))
    record.unlink(missing_ok=True)  # another test may have scanned the index
    assert health("check", image, "2", code=3)["status"] == "never-scanned"
    doc = health("scan", image, "2", code=1)
    assert not doc["healthy"]
    assert files(doc["packages"]["damaged"]) == DAMAGED
    assert files(doc["packages"]["drift"]) == {"/etc/adduser.conf": "content differs"}
    for f in doc["packages"]["damaged"] + doc["packages"]["drift"]:
        assert f["packages"] == OWNERS[f["path"]]
    assert doc["packages"]["bad_states"] == [] and doc["packages"]["errors"] == []
    assert doc["chunk_problems"] == [] and doc["chunk_files"] == {}
    assert doc["chunks_checked"] > 9000 and doc["firstboot"] == []
    with mounted(image, "2", tmp_path / "ro"):
        oracle = host_dpkg(tmp_path / "ro", "--verify")
        assert host_dpkg(tmp_path / "ro", "--audit") == ""
    assert as_dpkg_lines(doc) == set(oracle.splitlines())
    # check answers at once from the record, and the scan changed nothing
    t0 = time.monotonic()
    answer = health("check", image, "damaged", code=1)
    assert time.monotonic() - t0 < 5
    assert answer["status"] == "damaged"
    assert answer["counts"] == doc["counts"]
    assert answer["counts"]["damaged"] == 2 and answer["counts"]["drift"] == 1
    text = run_imagefs("health", "check", image, "2", check=False)
    assert text.returncode == 1 and b"damaged" in text.stdout
    # the pristine index: healthy, as dpkg says
    assert health("scan", image, "1", code=0)["counts"]["damaged"] == 0
    assert health("check", image, "minbase", code=0)["status"] == "healthy"
    assert sha(image) == before
    assert not workspace_mounts()  # nothing left


def _uuid(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(32)
    return head[16:32].hex()


def test_restore_from_another_index_stores_no_new_content(image: Path,
                                                          tmp_path: Path) -> None:
    img = copy(image, tmp_path / "copy.imagefs")
    size, unique = img.stat().st_size, info(img)["unique_bytes"]
    doc = health("restore", img, "2", "--source", f"{img}:1", code=0)
    item = doc["indices"][0]
    assert {r["path"] for r in item["result"]["restored"]} == set(DAMAGED)
    assert item["result"]["not_restored"] == [] and item["result"]["healthy_after"]
    assert item["commit"]["new_bytes"] == 0
    assert img.stat().st_size - size < 64 << 10  # metadata only
    assert info(img)["unique_bytes"] == unique
    assert verify(str(img)).ok
    last = info(img)["indices"][1]["history"][-1]
    assert last["action"] == "health restore"
    assert {r["path"] for r in last["result"]["restored"]} == set(DAMAGED)
    # check knows the new state at once; a second scan is clean, the drift stays
    assert health("check", img, "2", code=0)["status"] == "healthy"
    assert not workspace_mounts()
    again = health("scan", img, "2", code=0)
    assert again["packages"]["damaged"] == []
    assert files(again["packages"]["drift"]) == {"/etc/adduser.conf": "content differs"}
    src = fixture_tree("bookworm-minbase")
    with mounted(img, "2", tmp_path / "ro"):
        for path in DAMAGED:
            a, b = os.stat(f"{src}{path}"), os.stat(f"{tmp_path}/ro{path}")
            assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns, a.st_size) == \
                (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns, b.st_size)
            assert Path(f"{src}{path}").read_bytes() == Path(f"{tmp_path}/ro{path}").read_bytes()
        assert host_dpkg(tmp_path / "ro", "--verify").splitlines() == \
            ["??5?????? c /etc/adduser.conf"]


@pytest.fixture(scope="module")
def with_tree(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of image whose index 1 has `tree` installed by the image's own dpkg, then
    /usr/bin/tree overwritten and /usr/bin/xargs deleted (committed into index 1)."""
    work = tmp_path_factory.mktemp("tree")
    img = copy(image, work / "tree.imagefs")
    mnt = work / "rw"
    with mounted_rw(img, "1", mnt):
        done = run(mnt, ["dpkg", "-i", f"/run/debs/{TREE_DEB}"], binds=[(str(DEBS), "/run/debs")])
        assert done.returncode == 0, done.stderr.decode()
        run_imagefs("commit", mnt)
        (mnt / "usr/bin/tree").write_bytes(b"not tree at all\n" * 100)
        os.unlink(mnt / "usr/bin/xargs")
        run_imagefs("commit", mnt)
    return img


def test_restore_from_debs_and_what_has_no_source(image: Path, with_tree: Path,
                                                  tmp_path: Path) -> None:
    img = copy(with_tree, tmp_path / "t.imagefs")
    doc = health("scan", img, "1", code=1)
    assert files(doc["packages"]["damaged"]) == {"/usr/bin/tree": "content differs",
                                                 "/usr/bin/xargs": "missing"}
    doc = health("restore", img, "1", "--debs", DEBS, code=1)
    item = doc["indices"][0]
    assert [r["path"] for r in item["result"]["restored"]] == ["/usr/bin/tree"]
    cannot = {c["path"]: c["why"] for c in item["result"]["not_restored"]}
    assert set(cannot) == {"/usr/bin/xargs"} and "no .deb of findutils" in cannot["/usr/bin/xargs"]
    assert item["commit"]["changed"]
    text = run_imagefs("health", "restore", img, "1", "--debs", DEBS, check=False)
    assert text.returncode == 1 and b"cannot restore /usr/bin/xargs" in text.stdout
    after = health("check", img, "1", code=1)["scan"]  # the scan made before the commit
    assert files(after["packages"]["damaged"]) == {"/usr/bin/xargs": "missing"}
    with mounted(img, "1", tmp_path / "ro"):
        st = os.stat(tmp_path / "ro/usr/bin/tree")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o755, 0, 0)
        assert host_dpkg(tmp_path / "ro", "--verify").splitlines() == \
            ["missing     /usr/bin/xargs"]
    # the rest from the pristine index of another image; then all is well
    doc = health("restore", img, "1", "--debs", DEBS, "--source", f"{image}:1", code=0)
    assert [r["path"] for r in doc["indices"][0]["result"]["restored"]] == ["/usr/bin/xargs"]
    assert health("check", img, "1", code=0)["scan"]["packages"]["damaged"] == []


def crafted_tree_deb(work: Path) -> Path:
    """A .deb that says it is tree 2.1.0-1 amd64 but holds another /usr/bin/tree."""
    root = work / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tree").write_bytes(b"#!/bin/sh\necho impostor\n")
    (root / "usr/bin/tree").chmod(0o755)
    (root / "DEBIAN/control").write_text(
        "Package: tree\nVersion: 2.1.0-1\nArchitecture: amd64\nMaintainer: x <x@x>\n"
        "Description: not tree\n")
    out = work / "debs"
    out.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root),
                    str(out / TREE_DEB)], check=True, capture_output=True)
    return out


def test_restore_refuses_debs_that_differ_or_are_broken(with_tree: Path,
                                                        tmp_path: Path) -> None:
    img = copy(with_tree, tmp_path / "t.imagefs")
    before = sha(img)
    impostor = crafted_tree_deb(tmp_path)
    doc = health("restore", img, "1", "--debs", impostor, code=1)
    plan = doc["indices"][0]["plan"]
    assert plan["restore"] == []
    why = {c["path"]: c["why"] for c in plan["cannot"]}
    assert "differs from the image's md5sums; not used" in why["/usr/bin/tree"]
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (DEBS / TREE_DEB).read_bytes()
    (broken / TREE_DEB).write_bytes(data[: len(data) // 2])
    (broken / "junk.deb").write_bytes(b"not a package\n")
    doc = health("restore", img, "1", "--debs", broken, code=1)
    plan = doc["indices"][0]["plan"]
    assert plan["restore"] == []
    assert "not a readable package" in {c["path"]: c["why"] for c in plan["cannot"]}[
        "/usr/bin/tree"]
    assert any(n.startswith("junk.deb: not a readable package") for n in plan["notes"])
    assert sha(img) == before


@pytest.mark.parametrize("source, code, words", [
    ("{tmp}/missing.imagefs:1", 3, "no such image file"),
    ("{img}:9", 3, "no index '9'"),
    ("{img}", 2, "give IMAGE:INDEX"),
    ("{plain}:1", 2, "is not a Debian root"),
])
def test_restore_refuses_a_bad_source(image: Path, tmp_path: Path, source: str, code: int,
                                      words: str) -> None:
    img = copy(image, tmp_path / "c.imagefs")
    before = sha(img)
    plain = tmp_path / "plain.imagefs"
    if "{plain}" in source:
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree/hello").write_text("hi\n")
        run_imagefs("capture", tmp_path / "tree", plain, "--name", "plain")
    proc = run_imagefs("health", "restore", img, "2", "--source",
                       source.format(tmp=tmp_path, img=img, plain=plain), check=False)
    err = proc.stderr.decode()
    assert proc.returncode == code and words in err and len(err.strip().splitlines()) == 1
    assert sha(img) == before


def test_source_with_a_colon_and_a_source_lacking_the_file(image: Path,
                                                          tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    img = copy(image, odd / "x:y.imagefs")
    before = sha(img)
    doc = health("restore", img, "2", "--source", f"{img}:1", "--dry-run", code=0)
    assert {r["path"] for r in doc["indices"][0]["plan"]["restore"]} == set(DAMAGED)
    doc = health("restore", img, "2", "--source", f"{img}:damaged", code=1)
    why = {c["path"]: c["why"] for c in doc["indices"][0]["plan"]["cannot"]}
    assert why["/usr/bin/xargs"].startswith("not in the source")
    assert "differs from coreutils's md5sums" in why["/usr/bin/nl"]
    assert sha(img) == before


@pytest.mark.slow  # a whole scan more; the default run keeps item 5's scans and restores
def test_damaged_chunks_are_found_and_not_restorable(image: Path, tmp_path: Path) -> None:
    img = copy(image, tmp_path / "bad.imagefs")
    with open(img, "r+b") as fh:  # one bit of a pack in the middle of the file
        fh.seek(img.stat().st_size // 3)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x40]))
    before = sha(img)
    whole = verify(str(img))
    one = verify_index(str(img), "1")
    assert not whole.ok and not one.ok
    damaged = set(one.damaged)
    assert damaged and {p for pr in whole.problems for p in pr.paths} <= damaged
    doc = health("scan", img, "1", code=1)
    assert set(doc["chunk_files"]) == damaged and doc["chunk_problems"]
    assert doc["packages"]["damaged"] == []  # dpkg ran on the packages it could read
    doc = health("restore", img, "1", "--source", f"{image}:1", code=1)
    why = {c["path"]: c["why"] for c in doc["indices"][0]["plan"]["cannot"]}
    assert damaged <= set(why) and "cannot replace chunks" in why[sorted(damaged)[0]]
    assert sha(img) == before


@pytest.fixture
def rw_mount(image: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    img = copy(image, tmp_path / "m.imagefs")
    with mounted_rw(img, "1", tmp_path / "rw"):
        yield img, tmp_path / "rw"


@pytest.mark.slow  # two whole scans more in a caller's mount
def test_scan_and_restore_in_a_mount_with_a_bad_state(rw_mount: tuple[Path, Path]) -> None:
    img, mnt = rw_mount
    status = mnt / "var/lib/dpkg/status"
    text = status.read_text()
    head = "Package: adduser\nStatus: install ok installed\n"
    assert head in text
    status.write_text(text.replace(head, "Package: adduser\nStatus: install ok "
                                         "half-configured\n"))
    os.unlink(mnt / "usr/bin/xargs")
    doc = health("scan", "--mount", mnt, code=1)
    assert doc["mount"] == str(mnt)
    assert [b["package"] for b in doc["packages"]["bad_states"]] == ["adduser"]
    assert [b.package for b in parse_audit(host_dpkg(mnt, "--audit").encode())] == \
        ["adduser"]
    assert files(doc["packages"]["damaged"]) == {"/usr/bin/xargs": "missing"}
    doc = health("restore", "--mount", mnt, "--source", f"{img}:1", code=1)
    result = doc["indices"][0]["result"]
    assert [r["path"] for r in result["restored"]] == ["/usr/bin/xargs"]
    assert [c["packages"] for c in result["not_restored"]] == [["adduser"]]
    assert (mnt / "usr/bin/xargs").read_bytes() == \
        (fixture_tree("bookworm-minbase") / "usr/bin/xargs").read_bytes()
    assert host_dpkg(mnt, "--verify") == ""


def test_parse_verify_and_audit_lines() -> None:
    out = (b"??5??????   /usr/bin/x\n??5?????? c /etc/conffile\nmissing     /usr/bin/y\n"
           b"missing   c /etc/z\nmissing     /usr/bin/w (Permission denied)\n"
           b"?M5??????   /usr/lib/d\n")
    got = [(f.path, f.problem, f.detail, f.conffile) for f in parse_verify(out)]
    assert got == [("/usr/bin/x", "content differs", "??5??????", False),
                   ("/etc/conffile", "content differs", "??5??????", True),
                   ("/usr/bin/y", "missing", "missing", False),
                   ("/etc/z", "missing", "missing", True),
                   ("/usr/bin/w (Permission denied)", "missing", "missing", False),
                   ("/usr/lib/d", "not a regular file", "?M5??????", False)]
    audit = (b"The following packages have been unpacked but not yet configured.\n"
             b"They must be configured using dpkg --configure or the configure\n"
             b"menu option in dselect for them to work:\n"
             b" hello                small example package\n\n"
             b"The following packages are missing the md5sums control file in the\n"
             b"database, they need to be reinstalled:\n"
             b" libfoo:amd64         a library\n\n")
    states = parse_audit(audit)
    assert [(s.package, s.problem) for s in states] == [
        ("hello", "The following packages have been unpacked but not yet configured."),
        ("libfoo:amd64", "The following packages are missing the md5sums control file in "
                         "the database, they need to be reinstalled")]
    assert parse_audit(b"") == []


def test_check_answers_from_the_record_of_the_index_as_it_is(tmp_path: Path) -> None:
    """never-scanned, changed (a scan of another state only), healthy and damaged, from
    records written by the library (each kept beside the others)."""
    from servicing.health import save
    from servicing.health_scan import FileFinding, ScanReport

    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/f").write_text("x\n")
    img = tmp_path / "small.imagefs"
    run_imagefs("capture", tmp_path / "tree", img, "--name", "small")
    entry = info(img)["indices"][0]
    answer = health("check", img, "small", code=3)
    assert answer["status"] == "never-scanned" and answer["scan"] is None
    report = ScanReport(str(img), _uuid(img), 1, "small", entry["root"], "0" * 64, "then")
    save(report)
    assert health("check", img, "1", code=3)["status"] == "changed"
    report.digest, report.scanned = entry["digest"], "now"
    save(report)
    assert health("check", img, "1", code=0)["status"] == "healthy"
    report.digest = "1" * 64
    report.packages.damaged.append(FileFinding("/f", "missing", "missing", ["p"]))
    save(report)  # another state's scan, newer: the index's own is still found
    assert health("check", img, "1", code=0)["scan"]["scanned"] == "now"
    report.digest = entry["digest"]
    save(report)
    answer = health("check", img, "1", code=1)
    assert answer["status"] == "damaged" and answer["counts"]["missing"] == 1
    assert len(json.loads(Path(record_path(_uuid(img), "small")).read_text())["scans"]) == 3
