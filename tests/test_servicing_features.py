"""`imagefs feature list|enable|disable|mask|unmask` on bookworm-minbase and on a crafted
root holding every unit-file state, with the host's `systemctl --root` as the oracle (on
the fixture tree, on a crafted root, on a writable mount, on an extracted copy of the
committed index); bad input refused with one line and the image byte-identical; the verb
killed at random moments."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fixture_tree, mounted_rw, run_imagefs, servicing_leftovers
from features_helpers import (
    cli,
    crafted_root,
    feature_list,
    is_enabled,
    kill_at_random,
    oracle_list,
)
from servicing_helpers import NEEDS_DEBS, NEEDS_NSPAWN, sha
from test_servicing_transaction import cleaned_up

from imagefs.errors import NoSuchPath, Refused
from imagefs.image import Image
from servicing.features import FeatureChange
from servicing.transaction import service

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

SSH_LINK = "/etc/systemd/system/multi-user.target.wants/ssh.service"
EVERY_STATE = {"enabled", "disabled", "static", "masked", "masked-runtime", "alias",
               "indirect", "generated", "transient", "enabled-runtime", "linked", "bad"}


@pytest.fixture
def image(minbase_image: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "work.imagefs"
    shutil.copyfile(minbase_image, copy)
    yield copy
    assert servicing_leftovers() == []


def feature(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run_imagefs("feature", *args, "--no-daemon", check=check)


def history(image: Path) -> list[dict]:
    doc = json.loads(run_imagefs("info", image, "--json", "--history").stdout)
    return doc["indices"][0]["history"]


def extracted(image: Path, dest: Path) -> Path:
    """The index's unit directories written out by `imagefs extract` (not by the code
    under test), with the /lib -> usr/lib link: a root systemctl --root can read."""
    run_imagefs("extract", image, "1", "/etc/systemd", "/usr/lib/systemd", "/etc/init.d",
                "--dest", dest)
    (dest / "lib").symlink_to("usr/lib")
    return dest


# -- list ------------------------------------------------------------------------------

def test_list_is_systemctls_list_unit_files(minbase_image: Path) -> None:
    oracle = oracle_list(fixture_tree("bookworm-minbase"))
    assert feature_list(minbase_image, "1") == oracle
    text = feature("list", minbase_image, "minbase", "--state", "masked,static"
                   ).stdout.decode().splitlines()
    assert text[0].split() == ["UNIT", "FILE", "STATE", "PRESET"]
    rows = [ln.split() for ln in text[1:-2]]
    assert rows == [[u["unit"], u["state"], u["preset"] or "-"] for u in oracle
                    if u["state"] in ("masked", "static")]
    assert text[-1] == f"{len(rows)} unit files listed."


def test_every_state_of_a_crafted_root(tmp_path: Path) -> None:
    """Links in and out of the search path, a linked unit behind a symlinked directory,
    loops, escapes, runtime units, generators, presets: the copy systemctl reads is
    faithful, and nothing outside the image is read."""
    root = crafted_root(tmp_path / "root")
    image = tmp_path / "crafted.imagefs"
    run_imagefs("capture", root, image, "--name", "crafted")
    got = feature_list(image, "1")
    assert got == oracle_list(root)
    assert {u["state"] for u in got} == EVERY_STATE
    assert {u["unit"]: u["state"] for u in got}["linked.service"] == "linked"


def test_refusals_name_each_unit_and_change_nothing(tmp_path: Path) -> None:
    root = crafted_root(tmp_path / "root")
    image = tmp_path / "crafted.imagefs"
    run_imagefs("capture", root, image, "--name", "crafted")
    before = sha(image)
    cases = {
        ("enable", "masked.service"): "masked.service is masked: unmask it first",
        ("enable", "static.service"): "static.service is static",
        ("enable", "ind.service"): "ind.service is indirect",
        ("disable", "on-alias.service"): "on-alias.service is an alias of on.service",
        ("disable", "static.service"): "mask it instead",
        ("disable", "linked.service"): "linked.service is linked",
        ("enable", "gen.service"): "gen.service is generated",
        ("enable", "bad.service"): "unit bad.service: systemctl cannot tell its state",
        ("unmask", "vendor-masked.service"): "masked by the package that ships it",
        ("mask", "linked.service"): "/etc/systemd/system/linked.service is a unit file",
        ("disable", "nosuch"): "unknown unit nosuch.service",
        ("enable", "loop1.service"): "unit loop1.service: systemctl cannot tell its state",
    }
    for (verb, unit), said in cases.items():  # planned here: refused before any session
        with pytest.raises(Refused) as e:
            service(str(image), "1", FeatureChange(verb, [unit]), dry_run=True)
        assert said in e.value.message() and "\n" not in e.value.message(), (verb, unit, e)
    r = feature("disable", image, "1", "static.service", "nosuch", "on-alias.service",
                check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert all(u in err for u in ("static.service", "nosuch.service", "on-alias")), err
    assert sha(image) == before


# -- changes ---------------------------------------------------------------------------

def test_each_verb_is_seen_by_systemctl_is_enabled(image: Path, tmp_path: Path) -> None:
    """In a writable mount (--mount): every change as systemctl --root=MNT is-enabled sees
    it, with the SysV rc links and deb-systemd-helper's state following."""
    before = sha(image)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        units = ("ssh.service", "apt-daily.timer", "e2scrub_reap.service")
        assert is_enabled(mnt, *units) == dict.fromkeys(units, "enabled")
        feature("disable", "--mount", mnt, "ssh", "apt-daily.timer")
        assert is_enabled(mnt, *units) == {"ssh.service": "disabled",
                                           "apt-daily.timer": "disabled",
                                           "e2scrub_reap.service": "enabled"}
        assert not (mnt / "etc/rc2.d/S01ssh").exists()
        assert (mnt / "etc/rc2.d/K01ssh").is_symlink()
        dsh = mnt / "var/lib/systemd/deb-systemd-helper-enabled/ssh.service.dsh-also"
        assert SSH_LINK in dsh.read_text()
        feature("mask", "--mount", mnt, "e2scrub_reap")
        assert is_enabled(mnt, "e2scrub_reap.service") == {"e2scrub_reap.service": "masked"}
        feature("enable", "--mount", mnt, "ssh.service")
        feature("unmask", "--mount", mnt, "e2scrub_reap.service")
        assert is_enabled(mnt, *units) == {"ssh.service": "enabled",
                                           "apt-daily.timer": "disabled",
                                           "e2scrub_reap.service": "enabled"}
        assert (mnt / "etc/rc2.d/S01ssh").is_symlink()
        listed = feature_list("--mount", mnt)
        assert {u["unit"]: u["state"] for u in listed}["apt-daily.timer"] == "disabled"
    assert sha(image) == before  # a --mount change is the caller's to commit


def test_a_change_is_one_commit_with_its_history(image: Path, tmp_path: Path) -> None:
    before = sha(image)
    plan = feature("disable", image, "1", "ssh", "apt-daily.timer", "--dry-run")
    assert b"disable ssh.service (enabled -> disabled); SysV rc links follow" in plan.stdout
    assert sha(image) == before
    out = json.loads(feature("disable", image, "1", "ssh", "apt-daily.timer",
                             "--json").stdout)
    assert out["committed"]
    last = history(image)[-1]
    assert (last["action"], last["arguments"]) == (
        "feature disable", {"units": ["ssh.service", "apt-daily.timer"]})
    units = {u["unit"]: u for u in last["result"]["units"]}
    assert (units["ssh.service"]["from"], units["ssh.service"]["to"]) == ("enabled",
                                                                          "disabled")
    assert units["ssh.service"]["was_enabled"] is False
    assert units["ssh.service"]["sysv_rc_links"] == "disabled"
    removed = {r["path"] for r in last["result"]["links"]["removed"]}
    assert {SSH_LINK, "/etc/systemd/system/sshd.service", "/etc/rc2.d/S01ssh"} <= removed
    tree = extracted(image, tmp_path / "x")
    assert feature_list(image, "1") == oracle_list(tree)
    assert is_enabled(tree, "ssh.service", "apt-daily.timer") == {
        "ssh.service": "disabled", "apt-daily.timer": "disabled"}
    same = sha(image)
    assert b"Nothing changed." in feature("disable", image, "1", "ssh").stdout
    assert sha(image) == same


def test_bad_input_is_one_line_and_changes_nothing(image: Path) -> None:
    before = sha(image)
    for args, code, said in (
            (("disable", image, "1", "a/b.service"), 2, "bad unit name 'a/b.service'"),
            (("mask", image, "1", "x\x01y"), 2, "bad unit name 'x\\x01y'"),
            (("enable", image, "1", "../../etc/passwd"), 2, "bad unit name"),
            (("enable", image, "1", "x" * 300), 2, "bad unit name"),
            (("enable", image, "1", ""), 2, "bad unit name ''"),
            (("enable", image, "1"), 2, "nothing to do"),
            (("disable", image, "9", "ssh"), 3, "9"),
            (("disable", image.with_name("nosuch.imagefs"), "1", "ssh"), 3, "nosuch"),
            (("list", image, "1", "extra"), 2, "unexpected argument 'extra'")):
        r = feature(*args, check=False)
        err = r.stderr.decode()
        assert r.returncode == code and said in err, (args, r.returncode, err)
        assert err.startswith("imagefs: ") and err.count("\n") == 1, err
    assert sha(image) == before


# -- SIGKILL ---------------------------------------------------------------------------

def ssh_state(image: Path) -> str:
    """'old' if ssh is enabled in index 1 (its link, its rc links and deb-systemd-helper's
    state as before), 'new' if all say disabled; fails on anything in between."""
    found = []
    with Image.open(str(image)) as img:
        view = img.view("1")
        for path in (SSH_LINK, "/etc/systemd/system/sshd.service", "/etc/rc2.d/S01ssh"):
            try:
                view.lookup(path, follow=False)
                found.append(True)
            except NoSuchPath:
                found.append(False)
    assert len(set(found)) == 1, found
    return "old" if found[0] else "new"


def _kills(image: Path, rounds: int, seed: int) -> dict[str, int]:
    pristine = image.with_name("pristine.imagefs")
    shutil.copyfile(image, pristine)
    return kill_at_random(cli("feature", "disable", image, "1", "ssh"), image, pristine,
                          rounds, seed, lambda: ssh_state(image), cleaned_up,
                          servicing_leftovers)


def test_sigkill_at_random_moments(image: Path) -> None:
    seen = _kills(image, 5, seed=15)
    assert seen["old"] + seen["new"] == 5
    print(f"after 5 kills: {seen}")


@pytest.mark.slow
def test_sigkill_at_random_moments_50(image: Path) -> None:
    seen = _kills(image, 50, seed=1515)
    assert seen["old"] and seen["new"], seen
    print(f"after 50 kills: {seen}")
