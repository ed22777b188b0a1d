"""health restore's sources without a mount: a root made by the host's dpkg (--root) from
the fixture packages is damaged, planned and put back from the .debs or from a captured
copy of it, and the host's `dpkg --root --verify` is the oracle.  What the sources cost is
checked too: each .deb's data read once for every file wanted from it (only those files
kept), the source image opened once and closed afterwards, whatever happened."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_image, mounted_rw, run_imagefs
from servicing_helpers import DEBS, NEEDS_DEBS, NEEDS_NSPAWN

from imagefs.errors import Error, UsageError
from servicing.health_restore import RestoreChange, put_back, restore, restore_mount
from servicing.health_scan import Database, PackageFindings, ScanReport, parse_verify
from servicing.health_sources import DebSource
from servicing.roots import MountRoot

pytestmark = [NEEDS_DEBS, pytest.mark.skipif(
    shutil.which("dpkg") is None or os.geteuid() != 0, reason="needs root and dpkg")]

PACKAGES = ["hello_2.10-3_amd64.deb", "tree_2.1.0-1_amd64.deb", "libonig5_6.9.8-1_amd64.deb",
            "libjq1_1.6-2.1+deb12u3_amd64.deb", "jq_1.6-2.1+deb12u3_amd64.deb"]
# path -> new content (None: deleted); several files of hello, one or two of the others
DAMAGE: dict[str, bytes | None] = {
    "/usr/bin/hello": b"not hello\n",
    "/usr/share/info/hello.info.gz": None,
    "/usr/share/locale/de/LC_MESSAGES/hello.mo": b"x" * 5000,
    "/usr/share/locale/fr/LC_MESSAGES/hello.mo": None,
    "/usr/share/locale/nl/LC_MESSAGES/hello.mo": b"",
    "/usr/share/doc/hello/copyright": b"changed\n",
    "/usr/bin/tree": None,
    "/usr/lib/x86_64-linux-gnu/libonig.so.5.3.0": b"\0" * 100,
    "/usr/bin/jq": None,
    "/usr/share/doc/jq/README": b"changed\n",
}
DEBS_USED = {"hello_2.10-3_amd64.deb", "tree_2.1.0-1_amd64.deb", "libonig5_6.9.8-1_amd64.deb",
             "jq_1.6-2.1+deb12u3_amd64.deb"}


def dpkg_root(root: Path, *args: str) -> str:
    """The host's dpkg on a root directory (the oracle, and the installer of the fixture)."""
    out = subprocess.run(["dpkg", f"--root={root}", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def new_root(path: Path, debs: list[Path]) -> Path:
    (path / "var/lib/dpkg/info").mkdir(parents=True)
    (path / "var/lib/dpkg/updates").mkdir()
    (path / "var/lib/dpkg/status").touch()
    dpkg_root(path, "--force-depends", "-i", *map(str, debs))
    assert dpkg_root(path, "--verify") == ""
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture packages installed by the host's dpkg into an empty root."""
    return new_root(tmp_path_factory.mktemp("sources") / "clean", [DEBS / p for p in PACKAGES])


@pytest.fixture(scope="module")
def source_image(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("source") / "clean.imagefs"
    run_imagefs("capture", clean, path, "--name", "clean")
    return path


@pytest.fixture
def damaged(clean: Path, tmp_path: Path) -> Path:
    """A copy of clean with DAMAGE done, as the host's dpkg --verify sees it."""
    root = tmp_path / "root"
    shutil.copytree(clean, root, symlinks=True)
    for path, data in DAMAGE.items():
        if data is None:
            os.unlink(f"{root}{path}")
        else:
            Path(f"{root}{path}").write_bytes(data)
    assert {line.split()[-1] for line in dpkg_root(root, "--verify").splitlines()} == \
        set(DAMAGE)
    return root


def scan_of(root: Path) -> ScanReport:
    """What a scan of root reports, from the host's dpkg --verify (no container here)."""
    found = parse_verify(dpkg_root(root, "--verify").encode(), Database(MountRoot(str(root))))
    return ScanReport(str(root), "", 0, "root", 0, "", "", packages=PackageFindings(
        damaged=[f for f in found if not f.conffile]))


def fds() -> dict[int, str]:
    """This process's open descriptors and what they are."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the one listdir used is gone
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def on(path: Path) -> list[int]:
    """The descriptors this process holds open on the file at path."""
    real = os.path.realpath(path)
    return sorted(fd for fd, target in fds().items() if target == real)


class CountingDebs(DebSource):
    """A DebSource that records each pass it makes over a .deb's data."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.reads: list[str] = []

    def _read_deb(self, deb: str, keep: dict[str, set[str]], strict: bool = False) -> Any:
        self.reads.append(os.path.basename(deb))
        return super()._read_deb(deb, keep, strict)


def put_back_all(change: RestoreChange, root: Path) -> list[str]:
    """Plan from root's damage and write every restorable file back, as apply does; the
    paths put back."""
    change.scan = scan_of(root)
    plan = change.plan(MountRoot(str(root)))
    assert plan.cannot == [] and plan.notes == []
    for item in plan.restore:
        assert put_back(MountRoot(str(root)), item, change._content(item)) is None
    return [r.path for r in plan.restore]


def test_each_deb_is_read_once_for_all_its_files(damaged: Path) -> None:
    before = fds()
    change = RestoreChange(debs=str(DEBS))
    assert change.deb_source is not None
    change.deb_source = counting = CountingDebs(str(DEBS))
    with change:
        assert sorted(put_back_all(change, damaged)) == sorted(DAMAGE)
        reads = collections.Counter(counting.reads)
        assert set(reads) == DEBS_USED and set(reads.values()) == {1}, reads
        # only the wanted files were kept, in a temporary file (not in memory)
        kept = counting._kept._file
        assert kept is not None
        assert os.fstat(kept.fileno()).st_size == sum(
            os.stat(f"{damaged}{p}").st_size for p in DAMAGE)
    assert dpkg_root(damaged, "--verify") == ""  # the oracle: all put back, owner and mode
    assert fds() == before  # the kept file closed


def test_restored_files_are_the_packages_own(damaged: Path, clean: Path) -> None:
    with RestoreChange(debs=str(DEBS)) as change:
        put_back_all(change, damaged)
    for path in DAMAGE:
        a, b = os.stat(f"{clean}{path}"), os.stat(f"{damaged}{path}")
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_size, a.st_mtime_ns) == \
            (b.st_mode, b.st_uid, b.st_gid, b.st_size, b.st_mtime_ns), path
        assert Path(f"{clean}{path}").read_bytes() == Path(f"{damaged}{path}").read_bytes()


def test_no_room_to_keep_members(damaged: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary files cannot be made (tempfile.tempdir names no directory): the members
    are read from their .debs again, as put back needs them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "nowhere"))
    with RestoreChange(debs=str(DEBS)) as change:
        assert sorted(put_back_all(change, damaged)) == sorted(DAMAGE)
        assert change.deb_source is not None and change.deb_source._kept._file is None
    assert dpkg_root(damaged, "--verify") == ""


def hard_link_deb(work: Path) -> Path:
    """A package t whose /usr/share/t/b is a hard link to /usr/share/t/a in its tar."""
    root = work / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/t").mkdir(parents=True)
    (root / "usr/share/t/a").write_bytes(os.urandom(3000))
    os.link(root / "usr/share/t/a", root / "usr/share/t/b")
    (root / "usr/share/t/c").write_bytes(b"c\n")
    (root / "DEBIAN/control").write_text(
        "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: x <x@x>\nDescription: t\n")
    out = work / "debs"
    out.mkdir()
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root),
                    str(out / "t_1_all.deb")], check=True, capture_output=True)
    listing = subprocess.run(["dpkg-deb", "-c", str(out / "t_1_all.deb")],
                             capture_output=True, text=True, check=True).stdout
    assert "./usr/share/t/b link to ./usr/share/t/a" in listing
    return out


@pytest.mark.parametrize("lost, reads", [
    (["/usr/share/t/b"], 2),  # the link's target was not kept: read again for apply
    (["/usr/share/t/a", "/usr/share/t/b", "/usr/share/t/c"], 1),
])
def test_a_hard_link_in_a_deb(tmp_path: Path, lost: list[str], reads: int) -> None:
    debs = hard_link_deb(tmp_path)
    root = new_root(tmp_path / "root", [debs / "t_1_all.deb"])
    for path in lost:
        os.unlink(f"{root}{path}")
    change = RestoreChange(debs=str(debs))
    change.deb_source = counting = CountingDebs(str(debs))
    with change:
        assert sorted(put_back_all(change, root)) == lost
    assert counting.reads == ["t_1_all.deb"] * reads
    assert dpkg_root(root, "--verify") == ""
    data = (root / "usr/share/t/a").read_bytes()
    assert len(data) == 3000 and (root / "usr/share/t/b").read_bytes() == data


def test_files_asked_one_by_one_read_a_deb_twice_at_most(clean: Path) -> None:
    """find() without want() (as a plan), then content() (as apply): the .deb listed once,
    the members found read once more."""
    db = Database(MountRoot(str(clean)))
    with CountingDebs(str(DEBS)) as debs:
        paths = [p for p in DAMAGE if p.startswith("/usr/share/locale/")] + ["/usr/bin/hello"]
        finds = [debs.find(db, path, "hello", db.expected_md5(path, "hello") or "")
                 for path in paths]
        assert debs.reads == ["hello_2.10-3_amd64.deb"]
        for path, found in zip(paths, finds, strict=True):
            assert not isinstance(found, str), found
            digest = hashlib.md5(usedforsecurity=False)
            for data in debs.content(found.source, found.member):
                digest.update(data)
            assert digest.hexdigest() == db.expected_md5(path, "hello")
        assert debs.reads == ["hello_2.10-3_amd64.deb"] * 2
        why = debs.find(db, "/usr/bin/hello", "hello", "0" * 32)
        assert why == ("hello_2.10-3_amd64.deb: its /usr/bin/hello differs from the "
                       "image's md5sums; not used")
        assert debs.find(db, "/usr/bin/nothere", "hello", "0" * 32) == \
            "hello_2.10-3_amd64.deb: has no /usr/bin/nothere"
        assert len(debs.reads) == 2


def test_the_source_image_is_opened_once(damaged: Path, source_image: Path) -> None:
    assert on(source_image) == []
    change = RestoreChange(source=f"{source_image}:1")
    held = on(source_image)
    assert len(held) == 1  # opened (and checked) once, here
    change.scan = scan_of(damaged)
    plan = change.plan(MountRoot(str(damaged)))
    assert sorted(r.path for r in plan.restore) == sorted(DAMAGE)
    assert on(source_image) == held
    for item in plan.restore:
        assert put_back(MountRoot(str(damaged)), item, checking(change._content(item),
                                                                 source_image, held)) is None
    assert on(source_image) == held
    change.close()
    assert on(source_image) == []
    change.close()  # again: nothing
    assert dpkg_root(damaged, "--verify") == ""


def checking(content: Iterator[bytes], image: Path, held: list[int]) -> Iterator[bytes]:
    """content, checking at each step that the image is open once, as it was."""
    for data in content:
        assert on(image) == held
        yield data


def test_nothing_stays_open_when_restore_fails(source_image: Path, damaged: Path,
                                               tmp_path: Path) -> None:
    before = fds()
    target = tmp_path / "target.imagefs"
    shutil.copy(source_image, target)
    source = f"{source_image}:1"
    with pytest.raises(Error, match="no index '9'"):
        restore(str(target), "9", source=source, debs=str(DEBS))
    with pytest.raises(UsageError, match="not a directory"):
        restore(str(target), "1", source=source, debs=str(tmp_path / "none"))
    with pytest.raises(UsageError, match="not a live writable imagefs mount"):
        restore_mount(str(tmp_path), source=source, debs=str(DEBS))
    with pytest.raises(UsageError, match="no scan to plan from"), \
            RestoreChange(source=source, debs=str(DEBS)) as change:
        change.plan(MountRoot(str(damaged)))
    with pytest.raises(ZeroDivisionError), RestoreChange(source=source, debs=str(DEBS)) as change:
        put_back_all(change, damaged)
        _ = 1 / 0  # anything, after the .debs' members were kept
    assert on(source_image) == [] and on(target) == []
    assert fds() == before


@pytest.fixture(scope="module")
def minbase(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase (index 1, a copy of the session's capture) and a damaged copy of it
    (index 2)."""
    work = tmp_path_factory.mktemp("minbase")
    path = copy_image(minbase_image, work / "minbase.imagefs")
    with mounted_rw(path, "1", work / "rw"):
        os.unlink(work / "rw/usr/bin/xargs")
        (work / "rw/usr/bin/nl").write_bytes(b"damaged\n")
        run_imagefs("commit", work / "rw", "--new-index", "damaged")
    return path


@pytest.mark.slow  # a whole restore in this process (two scans, a session, a commit)
@NEEDS_NSPAWN
def test_a_whole_restore_holds_the_source_open_once(minbase: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.imagefs"
    shutil.copy(minbase, source)
    seen: list[tuple[str, list[int]]] = []

    class Watch:
        def step(self, text: str) -> None:
            seen.append((text, on(source)))

    outcome = restore(str(minbase), "2", source=f"{source}:1", progress=Watch())
    assert outcome.committed
    result = outcome.indices[0].result or {}
    assert sorted(r["path"] for r in result["restored"]) == ["/usr/bin/nl", "/usr/bin/xargs"]
    # one descriptor from the first step (the scan) to the commit; none once the change
    # is done (recording the new state of the index)
    held = [tuple(fds) for _text, fds in seen]
    assert held[0] and len(held[0]) == 1, seen
    last = max(i for i, (text, _) in enumerate(seen) if text == "checking and committing")
    assert set(held[:last + 1]) == {held[0]} and set(held[last + 1:]) <= {()}, seen
    assert any(text.startswith("restoring ") for text, _ in seen)
    assert on(source) == []
