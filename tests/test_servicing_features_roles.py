"""Features with packages: a disabled unit stays disabled and a mask stays a mask when
the package is upgraded (or reinstalled) with `imagefs package add`, checked with the
host's `systemctl --root=MNT is-enabled`; a role file (packages and units) applied as one
transaction, or not at all; hostile role files refused with one line; the features.*
daemon methods through a real socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted, mounted_rw, public_dir, run_imagefs, servicing_leftovers
from daemon_helpers import TEST_GID, call_as
from features_helpers import (
    CHRONY,
    is_enabled,
    repacked,
    systemctl,
)
from servicing_helpers import HELLO, NEEDS_DEBS, NEEDS_NSPAWN, sha
from test_servicing_daemon import (  # noqa: F401  (fixtures)
    d,
    daemon_root,
    module_daemon,
    via,
)

from daemon.client import Client
from imagefs.errors import NotFound, Refused
from servicing.roles import MAX_ITEMS, read_role

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

DSH_ENABLED = "var/lib/systemd/deb-systemd-helper-enabled"
DSH_MASKED = "var/lib/systemd/deb-systemd-helper-masked"
MEMBER = 47311  # a member of the daemon's group (TEST_GID), not root


def package(*args: str | Path) -> None:
    run_imagefs("package", *args, "--no-daemon")


def feature(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run_imagefs("feature", *args, "--no-daemon", check=check)


def info(image: Path) -> dict[str, Any]:
    return json.loads(run_imagefs("info", image, "--json", "--history").stdout)


def history(image: Path) -> list[dict]:
    return info(image)["indices"][0]["history"]


def dpkg_versions(mnt: Path, *names: str) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W",
                          "-f=${Package} ${db:Status-Abbrev}${Version}\n", *names],
                         capture_output=True, text=True)
    return dict(ln.split(" ", 1) for ln in out.stdout.splitlines())


@pytest.fixture(scope="module")
def with_chrony(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Path:
    """minbase with chrony installed (its postinst enabled chrony.service), then two
    shapes Debian's bookkeeping can take: chrony.service enabled without
    deb-systemd-helper's state (as an image builder's `systemctl enable` leaves it: a
    postinst would then enable it again), and chrony-wait.service masked by
    deb-systemd-helper (a postinst lifts such a mask)."""
    where = tmp_path_factory.mktemp("chrony")
    image = where / "chrony.imagefs"
    shutil.copyfile(minbase_image, image)
    package("add", image, "1", CHRONY)
    with mounted_rw(image, 1, where / "mnt") as _rec:
        mnt = where / "mnt"
        for path in (f"{DSH_ENABLED}/chrony.service.dsh-also",
                     f"{DSH_ENABLED}/multi-user.target.wants/chrony.service",
                     f"{DSH_ENABLED}/chronyd.service"):
            (mnt / path).unlink()
        (mnt / "etc/systemd/system/chrony-wait.service").symlink_to("/dev/null")
        (mnt / DSH_MASKED).mkdir()
        (mnt / DSH_MASKED / "chrony-wait.service").touch()
        run_imagefs("commit", mnt)
    return image


@pytest.fixture
def chrony_image(with_chrony: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "chrony.imagefs"
    shutil.copyfile(with_chrony, copy)
    yield copy
    assert servicing_leftovers() == []


@pytest.fixture
def image(minbase_image: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "work.imagefs"
    shutil.copyfile(minbase_image, copy)
    yield copy
    assert servicing_leftovers() == []


def chrony_states(image: Path, mnt: Path) -> tuple[dict[str, str], dict[str, str]]:
    with mounted(image, 1, mnt):
        return (is_enabled(mnt, "chrony.service", "chrony-wait.service"),
                dpkg_versions(mnt, "chrony"))


# -- item 2: a package upgrade or reinstall keeps the admin's choice --------------------

def test_disabled_and_masked_stay_so_when_the_package_is_upgraded(chrony_image: Path,
                                                                  tmp_path: Path) -> None:
    feature("disable", chrony_image, "1", "chrony")
    plan = feature("mask", chrony_image, "1", "chrony-wait", "--dry-run").stdout.decode()
    assert "the mask deb-systemd-helper made becomes the admin's" in plan
    feature("mask", chrony_image, "1", "chrony-wait")
    states, _ = chrony_states(chrony_image, tmp_path / "before")
    assert states == {"chrony.service": "disabled", "chrony-wait.service": "masked"}
    upgrade = repacked(CHRONY, tmp_path, "+imagefs1")
    package("add", chrony_image, "1", upgrade)
    states, versions = chrony_states(chrony_image, tmp_path / "after")
    assert versions == {"chrony": "ii 4.3-2+deb12u3+imagefs1"}
    assert states == {"chrony.service": "disabled", "chrony-wait.service": "masked"}


@pytest.mark.slow
def test_reinstalling_the_same_deb_keeps_it_disabled(chrony_image: Path,
                                                     tmp_path: Path) -> None:
    feature("disable", chrony_image, "1", "chrony")
    package("remove", chrony_image, "1", "chrony")
    package("add", chrony_image, "1", CHRONY)
    states, versions = chrony_states(chrony_image, tmp_path / "mnt")
    assert versions == {"chrony": "ii 4.3-2+deb12u3"}
    assert states["chrony.service"] == "disabled"


@pytest.mark.slow
def test_without_the_bookkeeping_an_upgrade_undoes_the_choice(chrony_image: Path,
                                                              tmp_path: Path) -> None:
    """The control of the test above: the same image, chrony disabled by a plain
    `systemctl --root disable` and chrony-wait left masked by deb-systemd-helper: the
    upgrade enables one and unmasks the other (the default test would catch a missing
    bookkeeping)."""
    with mounted_rw(chrony_image, 1, tmp_path / "rw"):
        assert systemctl(tmp_path / "rw", "disable", "chrony.service").returncode == 0
        run_imagefs("commit", tmp_path / "rw")
    package("add", chrony_image, "1", repacked(CHRONY, tmp_path, "+imagefs1"))
    states, _ = chrony_states(chrony_image, tmp_path / "mnt")
    assert states == {"chrony.service": "enabled", "chrony-wait.service": "disabled"}


# -- item 2: a role in one transaction --------------------------------------------------

def write_role(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_role_is_one_transaction(image: Path, tmp_path: Path) -> None:
    (tmp_path / "debs").symlink_to(HELLO.parent)
    role = write_role(tmp_path / "base.toml", f"""
        description = "no timers, no scrub"
        [packages]
        add = ["debs/{HELLO.name}"]
        [units]
        disable = ["apt-daily.timer", "apt-daily-upgrade.timer"]
        mask = ["e2scrub_reap"]
        """)
    before, was = sha(image), info(image)
    plan = feature("apply", image, "1", role, "--dry-run").stdout.decode()
    assert "install hello 2.10-3" in plan and "mask e2scrub_reap.service" in plan
    assert sha(image) == before
    feature("apply", image, "1", role)
    now = info(image)
    assert now["generation"] == was["generation"] + 1  # one publication
    entries = now["indices"][0]["history"]
    assert len(entries) == len(was["indices"][0]["history"]) + 1
    last = entries[-1]
    assert last["action"] == "feature apply"
    assert last["arguments"]["units"] == {"disable": ["apt-daily.timer",
                                                      "apt-daily-upgrade.timer"],
                                          "mask": ["e2scrub_reap.service"]}
    assert [a["package"] for a in last["result"]["packages"]["added"]] == ["hello"]
    assert {u["unit"]: u["to"] for u in last["result"]["units"]} == {
        "apt-daily.timer": "disabled", "apt-daily-upgrade.timer": "disabled",
        "e2scrub_reap.service": "masked"}
    with mounted(image, 1, tmp_path / "mnt"):
        mnt = tmp_path / "mnt"
        assert dpkg_versions(mnt, "hello") == {"hello": "ii 2.10-3"}
        assert is_enabled(mnt, "apt-daily.timer", "apt-daily-upgrade.timer",
                          "e2scrub_reap.service") == {
            "apt-daily.timer": "disabled", "apt-daily-upgrade.timer": "disabled",
            "e2scrub_reap.service": "masked"}


def static_unit_deb(where: Path) -> Path:
    """A package shipping a static unit (no [Install]): it cannot be enabled."""
    root = where / "build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: imagefs-static\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: imagefs tests <tests@example.org>\nDescription: a static unit\n")
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/imagefs-static.service").write_text(
        "[Service]\nExecStart=/bin/true\n")
    out = where / "imagefs-static_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out


def test_a_role_failing_after_its_packages_changes_nothing(image: Path,
                                                           tmp_path: Path) -> None:
    """The unit a package of the role brings is planned once the package is in: static
    there, it is refused, and the package is not installed either."""
    deb = static_unit_deb(tmp_path)
    role = write_role(tmp_path / "r.toml", f'[packages]\nadd = ["{deb.name}"]\n'
                      '[units]\nenable = ["imagefs-static.service", "ssh.service"]\n')
    before = sha(image)
    plan = feature("apply", image, "1", role, "--dry-run").stdout.decode()
    assert "comes with imagefs-static 1.0" in plan
    r = feature("apply", image, "1", role, check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and "imagefs-static.service is static" in err, err
    assert err.count("\n") == 1
    assert sha(image) == before


# -- item 4: hostile role files ---------------------------------------------------------

HOSTILE = {
    "not toml": ("[units\nenable = 1", "not a valid TOML file"),
    "unknown key": ("[units]\nstart = ['ssh']", "unknown key `units.start`"),
    "unknown table": ("[services]\nenable = ['ssh']", "unknown key `services`"),
    "wrong type": ("[units]\nenable = 'ssh'", "`units.enable` must be a list, not a string"),
    "wrong item": ("[units]\nmask = [1]", "`units.mask` must list strings, not a number"),
    "table item": ("[units]\nmask = [{a = 1}]", "must list strings, not a table"),
    "purge": ("[packages]\npurge = 'yes'", "`packages.purge` must be true or false"),
    "huge list": (f"[units]\ndisable = {[f'u{i}' for i in range(MAX_ITEMS + 1)]}",
                  f"lists {MAX_ITEMS + 1} entries"),
    "path": ("[units]\nenable = ['../../etc/shadow']", "bad unit name '../../etc/shadow'"),
    "slash": ("[units]\nmask = ['a/b.service']", "bad unit name 'a/b.service'"),
    "control": ('[units]\nmask = ["x\\u0007y"]', "bad unit name 'x\\x07y'"),
    "twice": ("[units]\nenable = ['ssh']\nmask = ['ssh.service']",
              "ssh.service is listed under both `units.enable` and `units.mask`"),
    "package": ("[packages]\nremove = ['Bad_Name']", "'Bad_Name' is not a Debian package"),
    "deb path": ('[packages]\nadd = ["a\\nb.deb"]', "holds control characters"),
    "empty": ("description = 'nothing'", "names nothing to do"),
    "deep": ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    "date": ("description = 1979-05-27", "must be a string"),
}


def test_hostile_role_files_are_refused_with_one_line(tmp_path: Path) -> None:
    for name, (text, said) in HOSTILE.items():
        role = write_role(tmp_path / f"{name.replace(' ', '-')}.toml", text)
        with pytest.raises(Refused) as e:
            read_role(str(role))
        assert said in e.value.message() and "\n" not in e.value.message(), (name, e.value)
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe[units]")
    with pytest.raises(Refused, match="not UTF-8"):
        read_role(str(tmp_path / "binary.toml"))
    (tmp_path / "big.toml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(Refused, match="over 1024 KiB"):
        read_role(str(tmp_path / "big.toml"))
    with pytest.raises(Refused, match="not a regular file"):
        read_role(str(tmp_path))
    with pytest.raises(NotFound):
        read_role(str(tmp_path / "missing.toml"))
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(Refused, match="not a regular file"):
        read_role(str(tmp_path / "fifo.toml"))


def test_a_hostile_role_through_the_cli(image: Path, tmp_path: Path) -> None:
    before = sha(image)
    for name in ("unknown key", "control", "huge list"):
        role = write_role(tmp_path / "r.toml", HOSTILE[name][0])
        r = feature("apply", image, "1", role, check=False)
        err = r.stderr.decode()
        assert r.returncode == 2 and err.startswith("imagefs: ") and err.count("\n") == 1
    assert sha(image) == before


# -- item 5: the daemon ------------------------------------------------------------------

def test_features_through_the_daemon(d: Any, image: Path, tmp_path: Path) -> None:  # noqa: F811
    with Client(str(d.sock), timeout=120) as c:
        listed = c.call("features.list", image=str(image), index=1)
    assert (listed["index"], listed["name"]) == (1, "minbase")
    states = {u["unit"]: u["state"] for u in listed["units"]}
    assert (states["ssh.service"], states["sshd.service"]) == ("enabled", "alias")
    assert listed["counts"]["enabled"] == sum(1 for s in states.values() if s == "enabled")
    via(d, "feature", "disable", image, "1", "apt-daily.timer")
    last = history(image)[-1]
    assert (last["action"], last["via"], last["method"]) == (
        "feature disable", "daemon", "features.disable"), last
    assert [(u["unit"], u["to"]) for u in last["result"]["units"]] == [
        ("apt-daily.timer", "disabled")]
    role = write_role(tmp_path / "r.toml", "[units]\nmask = ['e2scrub_reap']\n")
    via(d, "feature", "apply", image, "1", role)
    last = history(image)[-1]
    assert last["method"] == "features.apply"
    assert [(u["unit"], u["to"]) for u in last["result"]["units"]] == [
        ("e2scrub_reap.service", "masked")]
    r = via(d, "feature", "enable", image, "1", "nosuch", check=False)
    assert r.returncode == 2 and b"unknown unit nosuch.service" in r.stderr, r.stderr


def test_a_member_lists_but_may_not_change(d: Any, image: Path) -> None:  # noqa: F811
    """features.list is open to whoever may read the image; the changes are root's."""
    shared = public_dir("imagefs-features-") / "shared.imagefs"
    shutil.copyfile(image, shared)
    shared.chmod(0o644)
    before = sha(shared)
    listed = call_as(d.sock, MEMBER, [TEST_GID], "features.list", image=str(shared),
                     index=1)
    units = {u["unit"]: u["state"] for u in listed["result"]["units"]}
    assert units["ssh.service"] == "enabled", listed
    for method, params in (("features.disable", {"units": ["ssh"]}),
                           ("features.apply", {"role": str(shared)})):
        r = call_as(d.sock, MEMBER, [TEST_GID], method, image=str(shared), index=1,
                    **params)
        assert r["error"]["message"].startswith(f"{method}: runs the image's own"), r
    assert sha(shared) == before
