"""generalize against hostile images, and killed (issue 15, item 4).

A crafted root whose histories, host keys, machine ID, logs, caches and homes are
symlinks to /etc/shadow, /etc or out of the image: generalize removes each symlink as
itself (never its target), enters no directory through a symlink, and removes exactly
what its plan lists; the same from the image (IndexTree) and from a directory (MountTree).
A directory swapped for a symlink between the plan and the apply stops the run; nothing
outside is touched.  SIGKILL at random moments: the index wholly specialised or wholly
generalized, nothing left mounted (as tests/test_servicing_transaction.py does it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cli_zygote
import pytest
from conftest import (
    run_imagefs,
    servicing_leftovers,
    settled_after_a_kill,
    wait_until,
)
from generalize_helpers import sha, specialised_copy, state
from servicing_helpers import NEEDS_NSPAWN
from test_servicing_transaction import cleaned_up

from imagefs.errors import ServicingFailed
from imagefs.verify import verify
from servicing.generalize import Generalize
from servicing.generalize_fs import InRoot
from servicing.generalize_tree import shown
from servicing.roots import MountRoot
from servicing.transaction import Target

pytestmark = [NEEDS_NSPAWN]

SHADOW = b"root:$y$j9T$secret:19000:0:99999:7:::\n"
PASSWD = (b"root:x:0:0:root:/root:/bin/bash\n"
          b"alice:x:1000:1000::/home/alice:/bin/bash\n"
          b"evil:x:1001:1001::/home/evil:/bin/sh\n"
          b"far:x:1002:1002::/../../../../../../etc:/bin/sh\n"
          b"out:x:1003:1003::/home/out:/bin/sh\n"
          b"rel:x:1004:1004::relative/home:/bin/sh\n"
          b"bad:x:1005\n")
LINKS = {  # symlinks in the crafted root -> their targets
    "root/.bash_history": "/etc/shadow",
    "root/.zsh_history": "../etc/shadow",
    "home/alice/.python_history": "/etc/passwd",
    "home/evil": "/etc",
    "home/out": "../../../../../../outside",
    "tmp/escape": "/etc",
    "tmp/dir/x": "/etc/shadow",
    "var/log/journal": "/etc",
    "var/log/evil.log": "/etc/shadow",
    "var/cache/apt": "/etc",
    "var/crash": "/etc",
    "etc/ssh/ssh_host_rsa_key": "/etc/shadow",
    "var/lib/systemd/random-seed": "/etc/shadow",
    "etc/machine-id": "/etc/shadow",
    "etc/hostname": "/etc/shadow",
    "etc/passwd-": "/etc/passwd",
    "var/lib/dbus/machine-id": "/etc/shadow",
}
FILES = {
    "etc/shadow": SHADOW, "etc/passwd": PASSWD, "etc/hosts": b"127.0.0.1 localhost\n",
    "home/alice/.bash_history": b"secret\n", "etc/.bash_history": b"not a history\n",
    "var/lib/apt/lists/lock": b"", "var/lib/apt/lists/Packages": b"Package: x\n",
    "var/log/real.log": b"log line\n",
    os.fsdecode(b"tmp/not-utf8-\xff\xfe"): b"odd name\n",
}
# What the plan must remove (or rewrite): each symlink as itself, and the real files.
REMOVED = {"/root/.bash_history", "/root/.zsh_history", "/home/alice/.python_history",
           "/home/alice/.bash_history", "/etc/.bash_history", "/tmp/escape", "/tmp/dir/x",
           "/tmp/dir", "/etc/ssh/ssh_host_rsa_key", "/var/lib/systemd/random-seed",
           "/etc/passwd-", "/var/lib/apt/lists/Packages", "/var/log/real.log",
           "/tmp/not-utf8-\\xff\\xfe"}
REWRITTEN = {"/etc/machine-id", "/etc/hostname", "/var/lib/dbus/machine-id"}


def craft(root: Path) -> Path:
    """The hostile root at root (and an `outside` directory beside it that must stay)."""
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, target in LINKS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    (root / "var/tmp").mkdir(parents=True)
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / ".bash_history").write_bytes(b"outside\n")
    return outside


def planned(plan: dict) -> tuple[set[str], set[str]]:
    acts = [a for op in plan["operations"] for a in op["actions"]]
    return ({a["path"] for a in acts if a["action"] == "remove"},
            {a["path"] for a in acts if a["action"] != "remove"})


def snapshot(where: Path) -> dict[str, tuple[str, bytes]]:
    """Every path under where: its kind and its bytes (or link target)."""
    out = {}
    for p in sorted(where.rglob("*")):
        rel = "/" + str(p.relative_to(where))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p).encode())
        elif p.is_dir():
            out[rel] = ("dir", b"")
        else:
            out[rel] = ("file", p.read_bytes())
    return out


def test_symlinks_are_removed_as_themselves_in_a_directory(tmp_path: Path) -> None:
    """Planned from the directory (MountTree) and applied with no-follow operations."""
    root = tmp_path / "root"
    outside = craft(root)
    before = snapshot(root)
    change = Generalize()
    plan = change.plan(MountRoot(str(root)))
    removed, rewritten = planned(plan.to_json())
    assert removed == REMOVED and rewritten == REWRITTEN
    change.apply(Target(str(root), 1, "crafted"), plan, _Quiet())
    after = snapshot(root)
    assert {shown(p) for p in set(before) - set(after)} == REMOVED
    for path in set(after) - REWRITTEN:
        assert after[path] == before[path], path  # /etc/shadow, /etc, ... untouched
    assert after["/etc/machine-id"] == ("file", b"uninitialized\n")
    assert after["/etc/hostname"] == ("file", b"localhost\n")
    assert after["/var/lib/dbus/machine-id"] == ("link", b"/etc/machine-id")
    assert (outside / ".bash_history").read_bytes() == b"outside\n"
    notes = [n for op in plan.to_json()["operations"] for n in op["notes"]]
    assert notes == [], notes


def test_symlinks_are_removed_as_themselves_in_an_image(tmp_path: Path) -> None:
    """The same root captured: planned from the index (IndexTree), applied in a session;
    `imagefs diff` shows exactly the plan."""
    root = tmp_path / "root"
    craft(root)
    image = tmp_path / "crafted.imagefs"
    run_imagefs("capture", root, image, "--name", "crafted")
    dry = json.loads(run_imagefs("generalize", image, "1", "--dry-run", "--json",
                                 "--no-daemon").stdout)
    removed, rewritten = planned(dry["indices"][0]["plan"])
    assert removed == REMOVED and rewritten == REWRITTEN
    run_imagefs("generalize", image, "1", "--new-index", "generalized", "--no-daemon")
    d = json.loads(run_imagefs("diff", image, "1", "2", "--json").stdout)
    assert set(d["removed"]) == REMOVED and d["added"] == []
    assert {c["path"] for c in d["changed"] if "mtime" not in c["what"] or
            len(c["what"]) > 1} == REWRITTEN
    shadow = run_imagefs("cat", image, "2", "/etc/shadow").stdout
    assert shadow == SHADOW
    assert verify(str(image)).ok


def test_a_parent_swapped_for_a_symlink_stops_the_run(tmp_path: Path) -> None:
    """Between the plan and the apply /root becomes a symlink to a directory outside,
    and a planned file becomes a symlink: neither is followed."""
    root = tmp_path / "root"
    (root / "root").mkdir(parents=True)
    (root / "root/.bash_history").write_bytes(b"history\n")
    (root / "etc").mkdir()
    (root / "etc/passwd-").write_bytes(b"old\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".bash_history").write_bytes(b"outside\n")
    (root / "root").rename(root / "root.real")
    (root / "root").symlink_to(outside)
    with InRoot(str(root)) as fs, pytest.raises(ServicingFailed, match="gone"):
        fs.remove("/root/.bash_history", "file")
    (root / "etc/passwd-").unlink()
    (root / "etc/passwd-").symlink_to(outside / ".bash_history")
    with InRoot(str(root)) as fs, pytest.raises(ServicingFailed, match="a link now"):
        fs.remove("/etc/passwd-", "file")
    with InRoot(str(root)) as fs, pytest.raises(ServicingFailed, match="a link now"):
        fs.empty("/etc/passwd-")
    assert (outside / ".bash_history").read_bytes() == b"outside\n"
    assert (root / "root.real/.bash_history").exists()


def test_sshd_without_systemd_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/sshd").write_bytes(b"")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_bytes(b"key")
    image = tmp_path / "nosystemd.imagefs"
    run_imagefs("capture", root, image, "--name", "nosystemd")
    before = sha(image)
    r = run_imagefs("generalize", image, "1", "--no-daemon", check=False)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert "sshd but no systemd" in err and "--operations=-ssh-hostkeys" in err
    run_imagefs("generalize", image, "1", "--no-daemon", "--operations=-ssh-hostkeys",
                "--dry-run")
    listed = json.loads(run_imagefs("generalize", image, "1", "--list", "--json",
                                    "--no-daemon").stdout)
    assert "sshd but no systemd" in listed["found"]["ssh-hostkeys"]["refused"]
    assert sha(image) == before


class _Quiet:
    def step(self, text: str) -> None:
        pass


# -- SIGKILL ----------------------------------------------------------------------------

def kill_at_random(image: Path, rounds: int, seed: int) -> dict[str, int]:
    """SIGKILL `imagefs generalize IMAGE 1` at moments spread over its whole run; after
    the cleanup the image verifies, the index is wholly old or wholly new, and nothing of
    the verb is left (mounts, sessions, workspaces, containers)."""
    pristine = image.with_name("pristine.imagefs")
    shutil.copyfile(image, pristine)
    args = ["generalize", str(image), "1", "--no-daemon"]
    start = time.monotonic()
    done = cli_zygote.run(args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    whole = time.monotonic() - start
    assert state(image) == "new"
    shutil.copyfile(pristine, image)
    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    for _ in range(rounds):
        proc = cli_zygote.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The killed verb's mount process unmounts and ends on its own, a moment later
        # (or, killed while starting, ends without mounting): wait for both.
        settled_after_a_kill()
        assert wait_until(lambda: not [x for x in servicing_leftovers() if "/" in x], 15)
        cleaned_up()
        assert servicing_leftovers() == []
        assert verify(str(image)).ok
        now = state(image)
        seen[now] += 1
        if now == "new":
            shutil.copyfile(pristine, image)
    return seen


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    seen = kill_at_random(specialised_copy(tmp_path), 5, seed=15)
    assert seen["old"] + seen["new"] == 5
    print(f"after 5 kills: {seen}")


@pytest.mark.slow
def test_sigkill_at_random_moments_50(tmp_path: Path) -> None:
    seen = kill_at_random(specialised_copy(tmp_path), 50, seed=1515)
    assert seen["old"] and seen["new"], seen
    print(f"after 50 kills: {seen}")
