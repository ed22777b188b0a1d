"""servicing/transaction.py: plan, apply in writable sessions, one atomic commit of every
index or none, history, --dry-run, --mount, and SIGKILL at random moments.

The verb is mostly tests/servicing_victim.py (it writes /etc/imagefs-victim and removes
/etc/motd in the image's container), so these tests are about the transaction, not about
packages; the SIGKILL tests kill a real verb, `imagefs package add IMAGE all hello.deb`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cli_zygote
import pytest
from conftest import (
    copy_image,
    kernel_imagefs_mounts,
    mounted_rw,
    run_imagefs,
    servicing_leftovers,
    settled_after_a_kill,
    wait_until,
)
from servicing_helpers import HELLO, NEEDS_DEBS, NEEDS_NSPAWN, hello_state, sha

from imagefs.errors import NoSuchPath
from imagefs.image import Image
from imagefs.places import run_dir
from imagefs.session.mounts import cleanup
from imagefs.verify import verify
from servicing.transaction import cleanup_workspaces, service_mount

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]

VICTIM = Path(__file__).resolve().parent / "servicing_victim.py"




def info(image: Path) -> dict:
    return json.loads(run_imagefs("info", image, "--json", "--history").stdout)


def victim(image: Path, index: str, *args: str, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(VICTIM), str(image), index, *args],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def state(image: Path, index: str) -> str:
    """'new' if the victim's change is in the index, 'old' if not; fails if half."""
    with Image.open(str(image)) as img:
        view = img.view(index)
        present = []
        for path in ("/etc/imagefs-victim", "/etc/motd"):
            try:
                view.lookup(path)
                present.append(True)
            except NoSuchPath:
                present.append(False)
    assert present[0] != present[1], present
    return "new" if present[0] else "old"




@pytest.fixture(scope="module")
def two_indices(minbase_two_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase captured twice: indices 1 (one) and 2 (two) (the module's copy of
    the session's capture)."""
    return copy_image(minbase_two_image, tmp_path_factory.mktemp("tx") / "two.imagefs")


@pytest.fixture
def image(two_indices: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "work.imagefs"
    shutil.copyfile(two_indices, copy)
    yield copy
    assert servicing_leftovers() == []


def test_dry_run_changes_nothing(image: Path) -> None:
    before = sha(image)
    out = json.loads(victim(image, "all", "--dry-run").stdout)
    assert out["dry_run"] and not out["committed"]
    assert [i["plan"]["lines"] for i in out["indices"]] == [
        ["write /etc/imagefs-victim", "remove /etc/motd"]] * 2
    assert sha(image) == before


def test_one_index_commits_with_its_history(image: Path) -> None:
    generation = info(image)["generation"]
    out = json.loads(victim(image, "two").stdout)
    assert out["committed"] and out["indices"][0]["commit"]["changed"]
    doc = info(image)
    assert doc["generation"] == generation + 1
    assert (state(image, "1"), state(image, "2")) == ("old", "new")
    last = doc["indices"][1]["history"][-1]
    assert last["action"] == "test victim" and last["uid"] == 0
    assert last["arguments"] == {"fail_in": 0}
    assert last["result"] == {"wrote": "/etc/imagefs-victim"}
    assert last["paths"]["added"] == 1 and last["paths"]["removed"] == 1
    assert last["paths"]["first"]["added"] == ["/etc/imagefs-victim"]
    assert last["paths"]["first"]["removed"] == ["/etc/motd"]
    shown = run_imagefs("info", image, "2", "--history").stdout.decode()
    assert "test victim" in shown
    assert run_imagefs("verify", image).returncode == 0


def test_every_index_in_one_commit(image: Path) -> None:
    generation = info(image)["generation"]
    out = json.loads(victim(image, "all").stdout)
    assert [i["commit"]["changed"] for i in out["indices"]] == [True, True]
    assert info(image)["generation"] == generation + 1  # one publication for both
    assert (state(image, "1"), state(image, "2")) == ("new", "new")


def test_a_failure_in_one_index_leaves_every_index_as_it_was(image: Path) -> None:
    before = sha(image)
    proc = victim(image, "1,2", "--fail-in", "2", check=False)
    assert proc.returncode == 9  # ServicingFailed
    err = json.loads(proc.stdout)
    assert err["error"].startswith("index 2 (two): the script exited 3")
    assert "nothing was changed" in err["error"]
    assert "about to fail" in err["output"] and "oops" in err["output"]
    assert sha(image) == before


def test_new_index_of_one_only(image: Path) -> None:
    victim(image, "1", "--new-index", "serviced")
    names = [i["name"] for i in info(image)["indices"]]
    assert names == ["one", "two", "serviced"]
    assert (state(image, "one"), state(image, "serviced")) == ("old", "new")
    proc = victim(image, "all", "--new-index", "x", check=False)
    assert proc.returncode != 0 and "--new-index" in proc.stderr


def test_in_a_callers_mount_the_commit_is_the_callers(image: Path, tmp_path: Path) -> None:
    from servicing_victim import Victim

    before = sha(image)
    mnt = tmp_path / "mnt"
    with mounted_rw(image, 1, mnt):
        out = service_mount(str(mnt), Victim())
        assert out.mount == str(mnt) and not out.committed
        assert (mnt / "etc/imagefs-victim").read_text() == "1\n"
        assert sha(image) == before  # nothing committed yet
        run_imagefs("commit", mnt)
    assert state(image, "1") == "new"




def cleaned_up() -> None:
    """What `imagefs cleanup --all` does (imagefs/cli/cleanup_cmd.py), in this process:
    stale sessions discarded, killed verbs' workspaces cleared."""
    cleanup(None)
    cleanup_workspaces()


def kill_at_random(image: Path, rounds: int, seed: int) -> dict[str, int]:
    """SIGKILL `imagefs package add IMAGE all hello.deb` at a random moment, `rounds`
    times; after `imagefs cleanup --all` the image verifies clean, both indices are wholly
    old or wholly new (never one without the other: one commit), and nothing of the verb is
    left (mounts, sessions, containers, workspaces); test_cleanup_after_a_kill_is_the_cli
    shows the CLI's cleanup does the same."""
    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    args = ["package", "add", str(image), "all", str(HELLO), "--no-daemon"]
    # The moments are spread over the verb's whole run, as long as it takes here.
    start = time.monotonic()
    done = cli_zygote.run(args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    whole = time.monotonic() - start
    shutil.copyfile(image.with_name("pristine.imagefs"), image)
    for _ in range(rounds):
        proc = cli_zygote.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        settled_after_a_kill()
        cleaned_up()
        assert servicing_leftovers() == []
        assert verify(str(image)).ok
        now = (hello_state(image, "1"), hello_state(image, "2"))
        assert now[0] == now[1], now
        seen[now[0]] += 1
        if now[0] == "new":  # start again from the old state for the next round
            shutil.copyfile(image.with_name("pristine.imagefs"), image)
    return seen


def test_cleanup_after_a_kill_is_the_cli(image: Path) -> None:
    """A verb killed while its indices are mounted: `imagefs cleanup --all` leaves nothing."""
    argv = [sys.executable, "-m", "imagefs.cli", "package", "add", str(image), "all",
            str(HELLO), "--no-daemon"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = os.path.join(run_dir(), "servicing")
    assert wait_until(lambda: any(m.startswith(base) for m in kernel_imagefs_mounts()), 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_until(lambda: not [m for m in kernel_imagefs_mounts() if m.startswith(base)],
                      15)
    assert os.listdir(base)  # the killed verb's workspace, until the cleanup
    run_imagefs("cleanup", "--all")
    assert servicing_leftovers() == []
    assert verify(str(image)).ok
    assert hello_state(image, "1") == hello_state(image, "2") == "old"


def test_sigkill_at_random_moments(image: Path) -> None:
    shutil.copyfile(image, image.with_name("pristine.imagefs"))
    seen = kill_at_random(image, 20, seed=14)
    assert seen["old"] + seen["new"] == 20
    print(f"after 20 kills: {seen}")


@pytest.mark.slow
def test_sigkill_at_random_moments_200(image: Path) -> None:
    shutil.copyfile(image, image.with_name("pristine.imagefs"))
    seen = kill_at_random(image, 200, seed=1414)
    assert seen["old"] and seen["new"]
