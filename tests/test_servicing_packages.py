"""`imagefs package list`: the packages of an index read from its own dpkg database, without
mounting, equal to what `dpkg-query --admindir=MNT/var/lib/dpkg -W` prints on a mount of
the same index (dpkg-query is the oracle); a hostile or missing database is one line and an
exit code."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import fixture_tree, mounted, run_imagefs
from daemon_helpers import client, daemon_in_process

from daemon.protocol import RpcError

# Multi-Arch: same (qualified), a foreign architecture, config-files, a purged stanza and one
# never installed (not listed), a half-installed one, and a journal entry that wins.
CRAFTED_STATUS = """\
Package: dpkg
Status: install ok installed
Architecture: amd64
Version: 1.21.22
Multi-Arch: foreign

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9

Package: libc6
Status: install ok installed
Architecture: i386
Multi-Arch: same
Version: 2.36-9

Package: foo
Status: install ok installed
Architecture: i386
Version: 1.0

Package: gone
Status: purge ok not-installed
Architecture: amd64

Package: cfg
Status: deinstall ok config-files
Architecture: all
Version: 3

Package: never
Status: unknown ok not-installed
Architecture: amd64

Package: half
Status: install reinstreq half-installed
Architecture: amd64
Version: 0.1
"""
CRAFTED_UPDATE = "Package: foo\nStatus: install ok unpacked\nArchitecture: i386\nVersion: 1.1\n"


def listed(image: Path, index: str = "1") -> list[str]:
    doc = json.loads(run_imagefs("package", "list", image, index, "--json").stdout)
    return [f"{p['package']}\t{p['version']}" for p in doc["packages"]]


def dpkg_query(root: Path) -> list[str]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def capture(src: Path, image: Path) -> Path:
    run_imagefs("capture", src, image, "--name", "deb")
    return image


@pytest.fixture(scope="module")
def minbase_dpkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of bookworm-minbase's var/lib/dpkg (the whole database, 149 packages)."""
    root = tmp_path_factory.mktemp("minbase-dpkg")
    shutil.copytree(fixture_tree("bookworm-minbase") / "var/lib/dpkg",
                    root / "src/var/lib/dpkg", symlinks=True)
    return capture(root / "src", root / "dpkg.imagefs")


def test_a_real_database_lists_as_dpkg_query_shows_it_on_a_mount(minbase_dpkg: Path,
                                                                   tmp_path: Path) -> None:
    before = hashlib.sha256(minbase_dpkg.read_bytes()).digest()
    ours = listed(minbase_dpkg)
    with mounted(minbase_dpkg, 1, tmp_path / "mnt"):
        theirs = dpkg_query(tmp_path / "mnt")
    assert len(ours) == 149
    assert ours == theirs
    assert hashlib.sha256(minbase_dpkg.read_bytes()).digest() == before


def test_multiarch_states_and_the_journal_as_dpkg_query(tmp_path: Path) -> None:
    db = tmp_path / "src/var/lib/dpkg"
    (db / "updates").mkdir(parents=True)
    (db / "status").write_text(CRAFTED_STATUS)
    (db / "updates/0001").write_text(CRAFTED_UPDATE)
    image = capture(tmp_path / "src", tmp_path / "c.imagefs")
    with mounted(image, 1, tmp_path / "mnt"):
        theirs = dpkg_query(tmp_path / "mnt")
    assert listed(image) == theirs
    assert "foo:i386\t1.1" in theirs and "libc6:i386\t2.36-9" in theirs
    doc = json.loads(run_imagefs("package", "list", image, "1", "--json").stdout)
    assert doc["architecture"] == "amd64"
    states = {p["package"]: p["state"] for p in doc["packages"]}
    assert states["cfg"] == "config-files" and states["foo:i386"] == "unpacked"
    text = run_imagefs("package", "list", image, "1").stdout.decode().splitlines()
    assert text[0].split() == ["PACKAGE", "VERSION", "ARCH", "STATE"]
    assert text[1].split() == ["cfg", "3", "all", "config-files"]


def test_an_index_without_a_dpkg_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src/etc").mkdir(parents=True)
    image = capture(tmp_path / "src", tmp_path / "n.imagefs")
    r = run_imagefs("package", "list", image, "1", check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1
    assert "has no dpkg database (/var/lib/dpkg/status)" in err


def test_a_status_that_is_a_directory_is_a_bad_image(tmp_path: Path) -> None:
    (tmp_path / "src/var/lib/dpkg/status").mkdir(parents=True)
    image = capture(tmp_path / "src", tmp_path / "d.imagefs")
    r = run_imagefs("package", "list", image, "1", check=False)
    assert r.returncode == 4 and r.stderr.decode().count("\n") == 1


def test_garbage_and_control_characters_in_the_database(tmp_path: Path) -> None:
    db = tmp_path / "src/var/lib/dpkg"
    (db / "updates").mkdir(parents=True)
    (db / "status").write_bytes(
        b"Package: evil\x1b[2J\nStatus: install ok installed\nVersion: 1\xff\n"
        b"Architecture: amd64\n\n" + bytes(range(256)) * 8)
    (db / "updates/0002").write_bytes(bytes(range(256)) * 64)
    image = capture(tmp_path / "src", tmp_path / "g.imagefs")
    r = run_imagefs("package", "list", image, "1", check=False)
    assert r.returncode in (0, 4), r.stderr
    assert b"\x1b" not in r.stdout and b"\x1b" not in r.stderr
    assert r.stderr.decode(errors="replace").count("\n") <= 1


def test_package_needs_an_action(tmp_path: Path) -> None:
    r = run_imagefs("package", check=False)
    assert r.returncode == 2 and b"ACTION" in r.stderr
    r = run_imagefs("package", "list", tmp_path / "missing.imagefs", "1", check=False)
    assert r.returncode == 3 and r.stderr.decode().count("\n") == 1


@pytest.mark.trio
async def test_the_daemon_lists_the_same_packages(tmp_path: Path) -> None:
    db = tmp_path / "src/var/lib/dpkg"
    (db / "updates").mkdir(parents=True)
    (db / "status").write_text(CRAFTED_STATUS)
    (db / "updates/0001").write_text(CRAFTED_UPDATE)
    image = capture(tmp_path / "src", tmp_path / "c.imagefs")
    (tmp_path / "bare/etc").mkdir(parents=True)
    bare = capture(tmp_path / "bare", tmp_path / "bare.imagefs")
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock, state_dir=str(tmp_path / "state")), \
            client(sock) as c:
        doc = await c.call("packages.list", image=str(image), index=1)
        assert [f"{p['package']}\t{p['version']}" for p in doc["packages"]] == listed(image)
        with pytest.raises(RpcError) as e:
            await c.call("packages.list", image=str(image), index=7)
        assert e.value.code == -32003
        with pytest.raises(RpcError) as e:
            await c.call("packages.list", image=str(bare), index=1)
        assert e.value.code == -32002 and "no dpkg database" in e.value.message


STATUS_TEXT = (b"Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n\n"
               b"Package: b\nStatus: install ok installed\nVersion: 2\nArchitecture: all\n\n"
               b"Description: a stanza without a package is not one\n")


def test_a_status_file_is_parsed_once_per_process_and_read_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """servicing.packages._stanzas: the same bytes give the same parsed stanzas (a daemon
    plans copies of one image without parsing their status file again), which nobody can
    change; other bytes are parsed anew, and a text over KEPT_TEXT_MAX is not kept."""
    from servicing import packages

    first = packages._stanzas(STATUS_TEXT)
    assert [(f["Package"], f["Version"]) for f in first] == [("a", "1"), ("b", "2")]
    assert packages._stanzas(bytes(bytearray(STATUS_TEXT))) is first  # equal bytes
    with pytest.raises(TypeError):
        first[0]["Version"] = "9"  # type: ignore[index]
    changed = STATUS_TEXT.replace(b"Version: 2", b"Version: 3")
    assert [f["Version"] for f in packages._stanzas(changed)] == ["1", "3"]
    monkeypatch.setattr(packages, "KEPT_TEXT_MAX", 10)
    big = STATUS_TEXT + b"\n"
    assert packages._stanzas(big) is not packages._stanzas(big)
    assert packages._stanzas(big) == first
