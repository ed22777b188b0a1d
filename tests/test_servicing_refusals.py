"""`imagefs package add|remove` refusals: what cannot be done is refused before anything
changes, with one line naming every problem, a non-zero exit, the image byte for byte as it
was, and no mount or container left.  The packages are real (../shared/fixtures/debs) or
crafted here with dpkg-deb --build (and, for what dpkg-deb would not build, a data.tar
with unsafe names written with tarfile); the image is bookworm-minbase.  The resolver's
relations (alternatives, Provides, Conflicts both ways, dependents) are also tested
directly on small databases."""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import copy_image, fixture_tree, run_imagefs, servicing_leftovers
from servicing_helpers import HELLO, JQ, NEEDS_DEBS, NEEDS_NSPAWN, sha

from servicing.debs import Deb
from servicing.resolver import Database, pkg_of, plan_add, plan_remove
from servicing.transaction import Refused

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]


@functools.cache
def installed(name: str) -> str:
    """The version of name in bookworm-minbase, as dpkg-query says (the fixture may be
    rebuilt with newer packages)."""
    root = fixture_tree("bookworm-minbase")
    return subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                           "-f=${Version}", name], capture_output=True, text=True,
                          check=True).stdout


def versions(text: str) -> str:
    """text with each <name> replaced by the installed version of name."""
    return re.sub(r"<([^>]+)>", lambda m: installed(m[1]), text)






def build_deb(where: Path, name: str, version: str = "1.0", arch: str = "amd64",
              files: dict[str, bytes] | None = None, symlinks: dict[str, str] | None = None,
              scripts: dict[str, str] | None = None, md5sums: str | None = None,
              **fields: str) -> Path:
    """A .deb built by dpkg-deb --build --root-owner-group; fields: control fields
    (Depends="a, b")."""
    root = where / f"build-{name}-{version}-{arch}"
    (root / "DEBIAN").mkdir(parents=True)
    control = {"Package": name, "Version": version, "Architecture": arch,
               "Maintainer": "imagefs tests <tests@example.org>",
               "Description": f"{name} crafted for the imagefs tests",
               **{k.replace("_", "-"): v for k, v in fields.items()}}
    (root / "DEBIAN/control").write_text("".join(f"{k}: {v}\n" for k, v in control.items()))
    for path, data in (files or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    for path, target in (symlinks or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(target)
    if md5sums is not None:
        (root / "DEBIAN/md5sums").write_text(md5sums)
    for script, text in (scripts or {}).items():
        (root / "DEBIAN" / script).write_text(text)
        (root / "DEBIAN" / script).chmod(0o755)
    out = where / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out


def _tar_gz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def _ar_member(name: str, data: bytes) -> bytes:
    head = (f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n").encode()
    return head + data + (b"\n" if len(data) % 2 else b"")


def raw_deb(path: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A .deb whose data.tar holds exactly members (what dpkg-deb would not build)."""
    control = (f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@e.org>\n"
               f"Description: unsafe\n").encode()
    info = tarfile.TarInfo("./control")
    info.mode = 0o644
    path.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n")
                     + _ar_member("control.tar.gz", _tar_gz([(info, control)]))
                     + _ar_member("data.tar.gz", _tar_gz(members)))
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


@pytest.fixture(scope="module")
def minbase(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase as index 1 (minbase): the module's copy of the session's capture."""
    return copy_image(minbase_image,
                      tmp_path_factory.mktemp("refusals") / "minbase.imagefs")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every crafted package, built once."""
    d = tmp_path_factory.mktemp("crafted")
    hello = HELLO.read_bytes()
    (d / "truncated.deb").write_bytes(hello[: len(hello) // 2])
    (d / "text.deb").write_text("this is not a Debian package\n")
    (d / "empty.deb").write_bytes(b"")
    return {
        "truncated": d / "truncated.deb", "text": d / "text.deb", "empty": d / "empty.deb",
        "arm64": build_deb(d, "armtool", arch="arm64"),
        "i386": build_deb(d, "x86tool", arch="i386"),
        "old-hostname": build_deb(d, "hostname", "0.1-1"),
        "fake-awk": build_deb(d, "fake-awk", Conflicts="awk"),
        "rgrep": build_deb(d, "rgrep"),
        "old-chrony": build_deb(d, "chrony", "4.0-1"),
        "new-pam-bin": build_deb(d, "libpam-modules-bin",
                                 installed("libpam-modules-bin") + "+t1"),
        "bad-md5": build_deb(d, "badsum", files={"usr/share/badsum/a": b"a"},
                             md5sums=f"{'0' * 32}  usr/share/badsum/a\n"),
        "md5-missing": build_deb(d, "nosum", md5sums=f"{'0' * 32}  usr/bin/nothing\n"),
        "needs-awk": build_deb(d, "needs-awk", Depends="no-such-awk | awk"),
        "needs-libz1": build_deb(d, "needs-libz1", Depends="libz1 (>= 1)"),
        "breaks-each-a": build_deb(d, "pair-a", Breaks="pair-b"),
        "breaks-each-b": build_deb(d, "pair-b"),
        "escape-link": build_deb(d, "escape", symlinks={"usr/share/escape/x":
                                                        "../../../../etc/shadow"}),
        "inner-link": build_deb(d, "inner", symlinks={"usr/share/inner/x": "../../bin/sh",
                                                      "usr/share/inner/y": "/etc/passwd"}),
        "dotdot": raw_deb(d / "dotdot.deb", "dotdot", [(member("./../../etc/evil"), b"x")]),
        "absolute": raw_deb(d / "absolute.deb", "absolute", [(member("/etc/evil"), b"x")]),
        "hardlink": raw_deb(d / "hardlink.deb", "hardlink", [
            (member("./etc/"), b""), (member("./etc/x", tarfile.LNKTYPE, "../etc/shadow"),
                                      b"")]),
        "device": raw_deb(d / "device.deb", "device", [(member("./dev/evil", tarfile.CHRTYPE),
                                                        b"")]),
        "failing": build_deb(d, "failing", scripts={
            "postinst": "#!/bin/sh\necho 'postinst of failing: refusing to configure'\n"
                        "echo 'on stderr too' >&2\nexit 1\n"}),
    }


def refused(image: Path, *args: str | Path, code: int = 2) -> str:
    """Run a verb that must be refused; its one-line error (without `imagefs: `)."""
    before = sha(image)
    r = run_imagefs("package", *args[:1], image, "1", *args[1:], "--no-daemon", check=False)
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("imagefs: "), err
    assert r.stdout == b""
    assert sha(image) == before
    assert servicing_leftovers() == []
    return err.removeprefix("imagefs: ").strip()


@pytest.mark.parametrize("args, expected", [
    (["add", JQ], "jq 1.6-2.1+deb12u3 needs libjq1 (= 1.6-2.1+deb12u3), which neither the "
                  "image nor the given packages provide"),
    (["add", "{arm64}"], "armtool 1.0 is for arm64, but the image runs amd64"),
    (["add", "{i386}"], "x86tool 1.0 is for i386, but the image runs amd64"),
    (["add", "{old-hostname}"], "hostname 0.1-1 is older than the installed hostname "
                                "<hostname>: imagefs does not downgrade"),
    (["add", "{fake-awk}"], "fake-awk 1.0 conflicts with mawk <mawk> (installed)"),
    (["add", "{rgrep}"], "the installed grep <grep> conflicts with rgrep 1.0"),
    (["add", "{old-chrony}"], "the installed libc6 <libc6> breaks chrony 4.0-1"),
    (["add", "{new-pam-bin}"], "would break the installed libpam-modules <libpam-modules>, "
                               "which needs libpam-modules-bin (= <libpam-modules-bin>)"),
    (["add", "{needs-libz1}"], "needs-libz1 1.0 needs libz1 (>= 1), which neither"),
    (["add", "{breaks-each-a}", "{breaks-each-b}"], "pair-a 1.0 breaks pair-b 1.0 (given)"),
    (["add", "{truncated}"], "truncated.deb: truncated"),
    (["add", "{text}"], "text.deb: not a Debian package"),
    (["add", "{empty}"], "empty.deb: not a Debian package"),
    (["add", "{dotdot}"], "unsafe package: its data holds a path with a '..' component "
                          "(./../../etc/evil)"),
    (["add", "{absolute}"], "unsafe package: its data holds an absolute path (/etc/evil)"),
    (["add", "{escape-link}"], "its data holds a symlink pointing outside the root "
                               "(./usr/share/escape/x -> ../../../../etc/shadow)"),
    (["add", "{hardlink}"], "its data holds a hard link pointing outside the root"),
    (["add", "{device}"], "its data holds a device node (./dev/evil)"),
    (["add", "{bad-md5}"], "usr/share/badsum/a does not match its md5sum"),
    (["add", "{md5-missing}"], "its md5sums list usr/bin/nothing, which its data does not "
                               "hold"),
    (["add", "/no/such.deb"], "/no/such.deb: no such file"),
    (["add", JQ, "--repository", "/no/such/folder"], "no such folder"),
    (["remove", "dpkg"], "dpkg <dpkg> is essential to the image"),
    (["remove", "bash"], "bash <bash> is essential to the image"),
    (["remove", "libacl1"], "would break the essential package coreutils"),
    (["remove", "libapt-pkg6.0"], "removing libapt-pkg6.0 would break apt <apt> (needs "
                                  "libapt-pkg6.0 (>= <apt>)); add --with-dependents"),
    (["remove", "no-such-package"], "no-such-package is not installed"),
], ids=lambda v: "-".join(re.sub(r"\W", "", Path(str(a)).name) for a in v)
   if isinstance(v, list) else "")
def test_refused_before_anything_changes(minbase: Path, crafted: dict[str, Path],
                                         args: list[str | Path], expected: str) -> None:
    words = [crafted[str(a)[1:-1]] if str(a).startswith("{") else a for a in args]
    code = 3 if "no such" in expected else 2
    err = refused(minbase, *words, code=code)
    assert versions(expected) in err, err


def test_every_problem_is_named_in_one_line(minbase: Path, crafted: dict[str, Path]) -> None:
    err = refused(minbase, "add", JQ, crafted["arm64"], crafted["old-hostname"])
    assert "jq 1.6-2.1+deb12u3 needs libjq1" in err
    assert "armtool 1.0 is for arm64" in err and "hostname 0.1-1 is older" in err
    assert err.count("; ") >= 2


def test_what_is_met_is_not_refused(minbase: Path, crafted: dict[str, Path]) -> None:
    """Alternatives and Provides (mawk provides awk), safe symlinks (relative inside,
    absolute), and an essential package's removal only through dependents: dry runs."""
    before = sha(minbase)
    for deb in ("needs-awk", "inner-link"):
        out = run_imagefs("package", "add", minbase, "1", crafted[deb], "--dry-run",
                          "--no-daemon").stdout.decode()
        assert f"install {deb.split('-link')[0]}" in out and "Dry run" in out, out
    out = run_imagefs("package", "remove", minbase, "1", "libapt-pkg6.0", "--with-dependents",
                      "--dry-run", "--no-daemon").stdout.decode()
    assert f"remove libapt-pkg6.0 {installed('libapt-pkg6.0')}" in out
    assert f"remove apt {installed('apt')}" in out
    assert sha(minbase) == before


def test_a_failing_postinst_fails_the_transaction(minbase: Path, crafted: dict[str, Path],
                                                  tmp_path: Path) -> None:
    image = tmp_path / "m.imagefs"
    shutil.copyfile(minbase, image)
    before = sha(image)
    r = run_imagefs("package", "add", image, "1", crafted["failing"], "--no-daemon",
                    check=False)
    err = r.stderr.decode().splitlines()
    assert r.returncode == 9, err
    assert err[0] == ("imagefs: index 1 (minbase): dpkg --install failed: error processing "
                      "package failing (--install): installed failing package "
                      "post-installation script subprocess returned error exit status 1; "
                      "nothing was changed"), err
    assert all(line.startswith("  | ") for line in err[1:])
    assert "  | postinst of failing: refusing to configure" in err
    assert "  | on stderr too" in err
    assert sha(image) == before
    assert servicing_leftovers() == []
    listed = run_imagefs("package", "list", image, "1").stdout.decode()
    assert "failing" not in listed


# -- the resolver on small databases --

def db(*stanzas: dict[str, str]) -> Database:
    base = [{"Package": "dpkg", "Version": "1.21", "Architecture": "amd64"}]
    pkgs = [pkg_of(f, "installed") for f in base + list(stanzas)]
    return Database("test", "amd64", pkgs)


def deb(name: str, version: str = "1.0", arch: str = "amd64", **fields: str) -> Deb:
    control = {"Package": name, "Version": version, "Architecture": arch,
               **{k.replace("_", "-"): v for k, v in fields.items()}}
    return Deb(f"/r/{name}_{version}.deb", f"{name}_{version}.deb", name, 0, control)


def names(plan: object) -> list[str]:
    return [f"{a.kind} {a.pkg.name} {a.pkg.version}" for a in plan.actions]  # type: ignore


def test_versioned_provides_and_alternatives() -> None:
    image = db({"Package": "prov", "Version": "1", "Architecture": "all",
                "Provides": "virt (= 2.0), plain"})
    ok = plan_add(image, [deb("a", Depends="virt (>= 1.5), missing | plain")], [], False)
    assert names(ok) == ["install a 1.0"]
    with pytest.raises(Refused) as e:
        plan_add(image, [deb("b", Depends="plain (>= 1)")], [], False)
    assert "b 1.0 needs plain (>= 1), which neither" in e.value.args[0]


def test_repository_gives_the_first_alternative_at_its_highest_version() -> None:
    repo = [deb("lib", "1.0"), deb("lib", "2.0"), deb("other", "9"),
            deb("lib", "3.0", arch="arm64")]
    plan = plan_add(db(), [deb("app", Depends="nothing-here | lib (>= 1.5) | other")], repo,
                    False)
    assert names(plan) == ["install app 1.0", "install lib 2.0"]
    assert plan.actions[1].why == "from the repository (lib_2.0.deb)"


def test_an_installed_version_is_nothing_to_do_and_an_upgrade_is_planned() -> None:
    image = db({"Package": "tool", "Version": "1.0", "Architecture": "amd64",
                "Status": "install ok installed"})
    assert plan_add(image, [deb("tool", "1.0")], [], False).empty()
    plan = plan_add(image, [deb("tool", "1.1")], [], False)
    assert plan.lines()[0].startswith("upgrade tool 1.0 -> 1.1 (amd64")


def test_dependents_through_provides_and_alternatives() -> None:
    image = db({"Package": "base", "Version": "1", "Architecture": "amd64", "Provides": "v"},
               {"Package": "alt", "Version": "1", "Architecture": "amd64", "Provides": "w"},
               {"Package": "mid", "Version": "1", "Architecture": "amd64", "Depends": "v"},
               {"Package": "top", "Version": "1", "Architecture": "amd64", "Depends": "mid"},
               {"Package": "either", "Version": "1", "Architecture": "amd64",
                "Depends": "base | w"})
    with pytest.raises(Refused) as e:
        plan_remove(image, ["base"], False, False)
    assert "would break mid 1 (needs v)" in e.value.args[0]
    assert "either" not in e.value.args[0]  # alt provides w: still met
    plan = plan_remove(image, ["base"], True, True)
    assert names(plan) == ["purge base 1", "purge mid 1", "purge top 1"]


def test_an_essential_dependent_is_never_removed() -> None:
    image = db({"Package": "lib", "Version": "1", "Architecture": "amd64"},
               {"Package": "core", "Version": "1", "Architecture": "amd64",
                "Essential": "yes", "Depends": "lib"})
    with pytest.raises(Refused) as e:
        plan_remove(image, ["lib"], False, True)
    assert "would break the essential package core 1, which needs lib" in e.value.args[0]


def test_deferred_configuration_needs_pre_depends_configured_already() -> None:
    given = [deb("tool", Pre_Depends="helper"), deb("helper")]
    assert names(plan_add(db(), given, [], False)) == ["install tool 1.0",
                                                       "install helper 1.0"]
    with pytest.raises(Refused) as e:
        plan_add(db(), given, [], True)
    assert "tool 1.0 needs helper configured before it is unpacked" in e.value.args[0]


@pytest.mark.parametrize("keep", [1 << 30, 10])
def test_the_check_keeps_what_compressing_ahead_reads(tmp_path: Path, keep: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """open_deb keeps every regular file's content as its check read it (conffiles too,
    which md5sums leaves out), so that compressing ahead does not decompress the data
    again; past KEEP bytes it keeps nothing, and file_contents reads the .deb instead.
    Either way it gives what dpkg will write, in the archive's order."""
    from servicing import debs

    monkeypatch.setattr(debs, "KEEP", keep)
    files = {"usr/bin/tool": b"\x7fELF" + bytes(range(256)) * 40,
             "etc/tool.conf": b"setting = 1\n", "usr/share/doc/tool/empty": b""}
    path = build_deb(tmp_path, "tool", files=files)
    checked = debs.open_deb(str(path))
    assert (checked.contents is not None) is (keep > 20_000)
    every = list(debs.file_contents(checked, 1 << 30))
    assert sorted(every) == sorted(data for data in files.values() if data)
    assert list(debs.file_contents(checked, len(every[0]))) == every[:1]  # within `most`
