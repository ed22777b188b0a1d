"""imagefs generalize (servicing/generalize*.py): the plan lists exactly what the commit
removes and changes (oracle: `imagefs diff` of the specialised and the generalized index),
each operation on a specialised bookworm-minbase (tests/generalize_helpers.py), the
generalized index sharing every byte of content with the specialised one, the history,
--operations, --list, --mount, a second run with nothing to do, refusals.  The hostile
cases and the SIGKILL test are in test_servicing_generalize_hostile.py, the boot proof in
test_servicing_generalize_boot.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted_rw, run_imagefs
from generalize_helpers import (
    HOSTNAME,
    IDENTITY_FILES,
    IDENTITY_LINKS,
    KEPT,
    content,
    sha,
    specialised_copy,
)
from servicing_helpers import NEEDS_NSPAWN

from imagefs.errors import UsageError
from imagefs.format import layout as F
from imagefs.image import Image
from servicing.generalize import Generalize, defaults, select
from servicing.generalize_ops import OPERATIONS, PRESET
from servicing.roots import MountRoot

pytestmark = [NEEDS_NSPAWN]

FIRSTBOOT_ADDED = {  # what the first-boot queue adds (two items, the unit, the runner)
    "/usr/lib/imagefs", "/usr/lib/imagefs/firstboot",
    "/etc/systemd/system/imagefs-firstboot.service",
    "/etc/systemd/system/multi-user.target.wants/imagefs-firstboot.service",
    "/var/lib/imagefs", "/var/lib/imagefs/firstboot", "/var/lib/imagefs/firstboot/done",
    "/var/lib/imagefs/firstboot/queue",
    *(f"/var/lib/imagefs/firstboot/queue/{item}{f}"
      for item in ("0001-ssh-host-keys", "0002-drop-first-boot-preset")
      for f in ("", "/run", "/meta"))}


def generalize(*args: str | Path, check: bool = True) -> dict[str, Any]:
    r = run_imagefs("generalize", *args, "--json", "--no-daemon", check=check)
    return json.loads(r.stdout)


def refused(*args: str | Path, code: int = 2) -> str:
    r = run_imagefs(*args, check=False)
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert err.count("\n") == 1 and err.startswith("imagefs: "), err
    return err


def actions(plan: dict[str, Any], *kinds: str) -> set[str]:
    return {a["path"] for op in plan["operations"] for a in op["actions"]
            if a["action"] in kinds}


def diff(image: Path, a: str, b: str) -> dict[str, Any]:
    return json.loads(run_imagefs("diff", image, a, b, "--json").stdout)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return specialised_copy(tmp_path)


def test_the_dry_run_lists_exactly_what_the_commit_does(image: Path) -> None:
    before = sha(image)
    dry = generalize(image, "1", "--dry-run")
    assert dry["dry_run"] and not dry["committed"] and sha(image) == before
    plan = dry["indices"][0]["plan"]
    done = generalize(image, "1", "--new-index", "generalized")
    assert done["indices"][0]["plan"] == plan  # planned again in the transaction: the same
    d = diff(image, "1", "2")
    removed = actions(plan, "remove")
    assert set(d["removed"]) == {p.rstrip("/") for p in removed}
    assert set(d["added"]) == actions(plan, "mkdir", "create") | FIRSTBOOT_ADDED
    changed = {c["path"] for c in d["changed"] if set(c["what"]) & {"content", "type",
                                                                     "target", "size"}}
    assert changed == actions(plan, "write", "empty", "link")
    result = done["indices"][0]["result"]
    assert {p for op in result["operations"] for p in op["paths"]} == removed
    assert result["paths_removed"] == len(removed) == plan["paths_removed"]
    assert result["bytes_removed"] == plan["bytes_removed"] > 40_000
    history = json.loads(run_imagefs("info", image, "2", "--json", "--history").stdout)
    last = history["indices"][0]["history"][-1]
    assert last["action"] == "generalize" and last["result"] == result
    assert last["arguments"]["operations"] == defaults()


def test_every_operation_on_a_specialised_machine(image: Path) -> None:
    generalize(image, "1")
    gone = [rel for rel in [*IDENTITY_FILES, *IDENTITY_LINKS]
            if content(image, "1", "/" + rel) is None]
    kept = set(IDENTITY_FILES) - set(gone)
    assert kept == {"etc/hostname", "etc/hosts", "etc/machine-id", "var/log/wtmp",
                    "var/lib/dbus/machine-id", "var/lib/cloud/seed/nocloud/user-data"}, kept
    assert content(image, "1", "/etc/hostname") == b"localhost\n"
    hosts = content(image, "1", "/etc/hosts")
    assert hosts is not None and HOSTNAME.encode() not in hosts
    assert b"127.0.0.1\tlocalhost\n" in hosts and b"::1\tlocalhost ip6-localhost" in hosts
    assert content(image, "1", "/etc/machine-id") == b"uninitialized\n"
    assert content(image, "1", "/var/log/wtmp") == b""  # emptied, owner and mode kept
    assert content(image, "1", PRESET) is not None
    for rel in KEPT:
        assert content(image, "1", "/" + rel) is not None or _is_dir(image, "/" + rel), rel
    assert content(image, "1", "/etc/ssh/ssh_host_rsa_key") is None
    assert content(image, "1", "/etc/passwd-") is None
    with Image.open(str(image)) as img:
        view = img.view("1")
        dbus = view.lookup("/var/lib/dbus/machine-id", follow=False)
        assert dbus.target == b"/etc/machine-id"
        wtmp = view.lookup("/var/log/wtmp")
        assert (stat.S_IMODE(wtmp.mode), wtmp.size) == (0o664, 0)
        assert not [n for n, _k, _r in view.lookup("/var/log/journal").entries]
        assert [n for n, _k, _r in view.lookup("/tmp").entries] == []
    listed = json.loads(run_imagefs("firstboot", "list", image, "1", "--json").stdout)
    assert [(i["name"], i["state"]) for i in listed["items"]] == [
        ("ssh-host-keys", "queued"), ("drop-first-boot-preset", "queued")]


def _is_dir(image: Path, path: str) -> bool:
    with Image.open(str(image)) as img:
        return img.view("1").lookup(path, follow=False).kind == F.DIR


def test_the_generalized_index_shares_all_its_content(image: Path) -> None:
    size = image.stat().st_size
    unique = json.loads(run_imagefs("info", image, "--json").stdout)["unique_bytes"]
    done = generalize(image, "1", "--new-index", "generalized")
    d = diff(image, "1", "2")
    written = 0  # the bytes generalize itself wrote: new and rewritten files
    with Image.open(str(image)) as img:
        view = img.view("2")
        for path in [*d["added"], *(c["path"] for c in d["changed"])]:
            written += view.lookup(path, follow=False).size
    assert written < 8 << 10
    commit = done["indices"][0]["commit"]
    assert 0 < commit["new_bytes"] <= written
    after = json.loads(run_imagefs("info", image, "--json").stdout)
    assert after["unique_bytes"] - unique <= written
    assert image.stat().st_size - size < 64 << 10  # metadata, and those few bytes
    both = generalize(image, "all", "--dry-run")["indices"]
    assert [i["plan"]["paths_removed"] == 0 for i in both] == [False, True]
    print(f"generalized as a new index: +{image.stat().st_size - size} bytes of image for "
          f"{after['indices'][1]['bytes']} bytes of index; {written} bytes written")


def test_list_says_what_each_operation_does(image: Path) -> None:
    doc = json.loads(run_imagefs("generalize", "--list", "--json").stdout)
    names = [op["name"] for op in doc["operations"]]
    assert names == [op.name for op in OPERATIONS] and names[-1] == "machine-id"
    assert {"ssh-hostkeys", "hostname", "logfiles", "apt-cache", "apt-lists",
            "dhcp-client-state", "random-seed", "shell-history", "tmp-files",
            "passwd-backups", "cloud-init", "crash-data", "udev-persistent-net",
            "machine-id"} <= {op["name"] for op in doc["operations"] if op["default"]}
    assert [op["name"] for op in doc["operations"] if not op["default"]] == ["ssh-userdir"]
    assert all(op["description"] and op["paths"] for op in doc["operations"])
    text = run_imagefs("generalize", "--list").stdout.decode()
    assert "ssh-userdir          no" in text
    before = sha(image)
    doc = json.loads(run_imagefs("generalize", image, "1", "--list", "--json",
                                 "--operations=-logfiles").stdout)
    found = doc["found"]
    assert found["logfiles"]["paths"] >= 7 and found["shell-history"]["paths"] == 5
    rules = IDENTITY_FILES["etc/udev/rules.d/70-persistent-net.rules"]
    assert found["udev-persistent-net"] == {"paths": 1, "bytes": len(rules), "queue": False}
    assert [op["selected"] for op in doc["operations"]].count(False) == 2  # and userdir
    assert sha(image) == before


@pytest.mark.parametrize(("spec", "chosen"), [
    (None, defaults()),
    ("logfiles,tmp-files", ["tmp-files", "logfiles"]),
    ("machine-id,hostname", ["hostname", "machine-id"]),  # machine-id always last
    ("-ssh-hostkeys", [n for n in defaults() if n != "ssh-hostkeys"]),
    ("+ssh-userdir", [op.name for op in OPERATIONS]),
    ("defaults,+ssh-userdir,-hostname", [op.name for op in OPERATIONS
                                         if op.name != "hostname"]),
    ("all,-machine-id", [op.name for op in OPERATIONS if op.name != "machine-id"]),
    (" tmp-files , logfiles ", ["tmp-files", "logfiles"]),
    ("tmp-files,tmp-files", ["tmp-files"]),
])
def test_operations_choose(spec: str | None, chosen: list[str]) -> None:
    assert select(spec) == chosen


BAD_SPECS = [
    ("nosuch", "unknown operation 'nosuch'"),
    ("machine_id", "unknown operation 'machine_id' (did you mean 'machine-id'?)"),
    ("tmp-files,,logfiles", "an empty name"),
    ("tmp-files,", "an empty name"),
    ("", "an empty name"),
    ("+-tmp-files", "unknown operation"),
    ("-all", "`all` is a group"),
    ("tmp-files,-tmp-files", "tmp-files is both chosen and left out"),
    ("all,-" + ",-".join(op.name for op in OPERATIONS), "chooses no operation"),
    ("Tmp-Files", "unknown operation"),
    ("tmp files", "unknown operation"),
    ("x" * 5000, "over 4096 characters"),
    ("machine-id\nhostname", "unknown operation"),
]


@pytest.mark.parametrize(("spec", "says"), BAD_SPECS)
def test_bad_operations_are_refused(spec: str, says: str) -> None:
    with pytest.raises(UsageError, match="--operations") as e:
        select(spec)
    assert says in e.value.message()


def test_the_cli_refuses_bad_operations_in_one_line(image: Path) -> None:
    before = sha(image)
    for spec, says in (BAD_SPECS[1], BAD_SPECS[2], BAD_SPECS[7]):
        assert says in refused("generalize", image, "1", f"--operations={spec}")
    assert "unknown operation" in refused("generalize", "--list", "--operations=x")
    assert sha(image) == before


def test_bad_usage_is_refused(image: Path) -> None:
    before = sha(image)
    assert "IMAGE INDEX" in refused("generalize", image)
    assert "unexpected argument" in refused("generalize", image, "1", "extra")
    assert "--list takes IMAGE INDEX" in refused("generalize", image, "--list")
    assert "leave out --dry-run" in refused("generalize", image, "1", "--list", "--dry-run")
    r = run_imagefs("generalize", image, "9", check=False)
    assert r.returncode == 3 and r.stderr.count(b"\n") == 1
    r = run_imagefs("generalize", image, "1", "--operations", check=False)
    assert r.returncode == 2
    assert sha(image) == before


def test_a_second_run_has_nothing_to_do(image: Path) -> None:
    generalize(image, "1")
    before = sha(image)
    again = generalize(image, "1")
    assert not again["committed"]
    plan = again["indices"][0]["plan"]
    assert plan["paths_removed"] == plan["paths_changed"] == plan["items_queued"] == 0
    notes = {op["name"]: op["notes"] for op in plan["operations"]}
    assert any("already queued" in n for n in notes["ssh-hostkeys"]), notes
    assert sha(image) == before
    out = run_imagefs("generalize", image, "1", "--no-daemon").stdout.decode()
    assert "machine-id: nothing to do" in out and out.endswith("Nothing changed.\n")


def test_in_a_mount_the_commit_is_the_callers(image: Path, tmp_path: Path) -> None:
    before = sha(image)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        dry = generalize("--mount", mnt, "--dry-run")
        assert sha(image) == before
        out = run_imagefs("generalize", "--mount", mnt, "--no-daemon").stdout.decode()
        assert f"commit it with: imagefs commit {mnt}" in out
        assert not (mnt / "root/.bash_history").exists()
        assert (mnt / "etc/machine-id").read_bytes() == b"uninitialized\n"
        assert os.readlink(mnt / "var/lib/dbus/machine-id") == "/etc/machine-id"
        assert sha(image) == before
        run_imagefs("commit", mnt)
    index = generalize(image, "1", "--dry-run")["indices"][0]["plan"]
    assert index["paths_removed"] == 0  # the mount's plan was the index's: all done
    assert dry["indices"][0]["plan"]["paths_removed"] > 40
    assert content(image, "1", "/etc/machine-id") == b"uninitialized\n"


@pytest.mark.parametrize(("hostname", "hosts", "expected"), [
    ("web.example.org\n",
     "127.0.0.1 localhost\n127.0.1.1 web.example.org web # the host\n::1 ip6-localhost\n",
     "127.0.0.1 localhost\n::1 ip6-localhost\n"),
    ("web\n", "127.0.0.1 localhost web\n10.0.0.5\tweb.lan db.lan\n",
     "127.0.0.1\tlocalhost\n10.0.0.5\tdb.lan\n"),
    ("localhost.localdomain\n", "127.0.0.1 localhost localhost.localdomain\n", None),
    ("localhost\n", "127.0.1.1 old\n", None),
])
def test_hosts_forgets_the_old_name_only(tmp_path: Path, hostname: str, hosts: str,
                                         expected: str | None) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/hostname").write_text(hostname)
    (tmp_path / "etc/hosts").write_text(hosts)
    plan = Generalize("hostname").plan(MountRoot(str(tmp_path)))
    written = {a.path: a.data.decode() for a in plan.actions()}
    assert written.get("/etc/hosts") == expected
    assert ("/etc/hostname" in written) == (hostname != "localhost\n")
