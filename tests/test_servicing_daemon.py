"""Servicing across indices and through the daemon (issue 14, items 3 and 7).

Item 3: `imagefs package add IMAGE all hello.deb` on a two-index image installs hello in
both indices in ONE publication (the image's generation goes up by one) with a history
entry in each; when index 2 cannot take it (a file conflict dpkg finds at unpack time) the
image stays byte for byte as it was, index 1 included, and the error names index 2.

Item 7: the servicing methods through a real `imagefs daemon` process, as the CLI's
`--daemon` path uses them (and through daemon.client): package add, remove and --dry-run,
a refusal and a failing maintainer script (the same message and exit code as without the
daemon), firstboot add, list and remove, health scan and check, job.progress
notifications, jobs.cancel at once, mid-transaction and just before the commit, and a
non-root caller refused.

The oracles are the image's own dpkg database read by the host's dpkg-query on a read-only
mount, the image file's sha256, `imagefs info --json` (generation, history) and findmnt.
After every test no imagefs mount, servicing workspace or daemon session may be left."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    copy_image,
    kernel_imagefs_mounts,
    mounted,
    mounted_rw,
    run_imagefs,
    wait_until,
)
from daemon_helpers import (
    TEST_GID,
    DaemonProcess,
    as_user,
    call_as,
    daemon_process,
    end_sessions,
)
from servicing_helpers import HELLO, JQ, NEEDS_DEBS, NEEDS_NSPAWN, hello_state, sha

from daemon.client import Client
from daemon.protocol import INVALID_PARAMS, RpcError
from imagefs.places import run_dir

pytestmark = [NEEDS_NSPAWN, NEEDS_DEBS]
MEMBER = 47311  # a member of the daemon's group (TEST_GID), not root
ROOT_ONLY = ("runs the image's own programs as root in a container; only root may ask "
             "for it")
FAILING_FIRST_LINE = (
    "imagefs: index 1 (one): dpkg --install failed: error processing package failing "
    "(--install): installed failing package post-installation script subprocess returned "
    "error exit status 1; nothing was changed")




def info(image: Path) -> dict[str, Any]:
    return json.loads(run_imagefs("info", image, "--json", "--history").stdout)


def last_entry(image: Path, index: int) -> dict[str, Any]:
    return info(image)["indices"][index - 1]["history"][-1]


def dpkg_states(image: Path, where: Path, package: str, *indices: int) -> list[str]:
    """The package's db:Status-Abbrev ("ii", "rc"; "" when dpkg knows nothing of it) in
    each index, by the host's dpkg-query on a read-only mount of the index."""
    found = []
    for index in indices:
        mnt = where / f"ro-{index}"
        with mounted(image, str(index), mnt):
            q = subprocess.run(["dpkg-query", f"--admindir={mnt}/var/lib/dpkg", "-W",
                                "-f=${db:Status-Abbrev}", package],
                               capture_output=True, text=True)
            found.append(q.stdout.strip() if q.returncode == 0 else "")
            assert q.returncode == 0 or "no packages found" in q.stderr, q.stderr
    return found




def imagefs_mounts() -> list[str]:
    """Targets of every fuse.imagefs mount, as findmnt lists them."""
    out = subprocess.run(["findmnt", "-rn", "-t", "fuse.imagefs", "-o", "TARGET"],
                         capture_output=True, text=True)
    return [ln.replace("\\x20", " ") for ln in out.stdout.splitlines()]


def left_behind(daemon_state: Path | None = None) -> list[str]:
    """Mounts under the run directory (servicing workspaces, the daemon's sessions),
    workspaces, processes working in them (containers), and sessions of the daemon."""
    run = run_dir()
    base = os.path.join(run, "servicing")
    left = [m for m in imagefs_mounts() if m.startswith(run + "/")]
    left += os.listdir(base) if os.path.isdir(base) else []
    left += [f"{p.pid} {' '.join(p.info['cmdline'])}"
             for p in psutil.process_iter(["cmdline"])
             if any(a.startswith(base + "/") for a in p.info["cmdline"] or [])]
    sessions = daemon_state / "sessions" if daemon_state is not None else None
    if sessions is not None and sessions.is_dir():
        left += [f"daemon session {s.name}" for s in sessions.iterdir()]
    return left


def build_deb(where: Path, name: str, scripts: dict[str, str]) -> Path:
    """A small .deb (dpkg-deb --build --root-owner-group) with maintainer scripts."""
    root = where / f"build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\n"
        "Maintainer: imagefs tests <tests@example.org>\n"
        f"Description: {name} crafted for the imagefs tests\n")
    for script, text in scripts.items():
        (root / "DEBIAN" / script).write_text(text)
        (root / "DEBIAN" / script).chmod(0o755)
    out = where / f"{name}_1.0_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def two_indices(minbase_two_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bookworm-minbase captured twice: indices 1 (one) and 2 (two) (the module's copy of
    the session's capture).  Shared: copy it."""
    return copy_image(minbase_two_image,
                      tmp_path_factory.mktemp("svc-daemon") / "two.imagefs")


@pytest.fixture(scope="module")
def daemon_root() -> Iterator[Path]:
    """The daemon's directory (socket, state, log): every uid may enter it (a member of
    its group connects); removed at the end of the module."""
    root = Path(tempfile.mkdtemp(prefix="imagefs-svcd-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def module_daemon(daemon_root: Path) -> Iterator[DaemonProcess]:
    """One `imagefs daemon` process for the module, admitting group TEST_GID."""
    with daemon_process(daemon_root, "--group", str(TEST_GID)) as d:
        yield d
    end_sessions(d.state, Path(run_dir()) / "servicing")  # if a test failed half-way


@pytest.fixture
def d(module_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's daemon; after the test nothing of its work may be left."""
    yield module_daemon
    assert module_daemon.proc is not None and module_daemon.proc.poll() is None, (
        module_daemon.log.read_text()[-4000:])
    assert left_behind(module_daemon.state) == []


@pytest.fixture
def image(two_indices: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "work.imagefs"
    shutil.copyfile(two_indices, copy)
    yield copy
    assert left_behind() == []


def via(d: DaemonProcess, *args: str | Path, check: bool = True
        ) -> subprocess.CompletedProcess[bytes]:
    """The CLI with --daemon, talking to d."""
    return run_imagefs(*args, "--daemon", check=check, env={"IMAGEFS_SOCKET": str(d.sock)})


def cli_here(d: DaemonProcess, *args: str) -> tuple[int, str, str]:
    """The CLI's main() in this process (a forked child of another uid: the venv's python
    is under /root, which that uid cannot enter): (exit code, stdout, stderr)."""
    from imagefs.cli import main

    os.environ["IMAGEFS_SOCKET"] = str(d.sock)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def here(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """The CLI doing the work in its own process."""
    return run_imagefs(*args, "--no-daemon", check=check)


# -- item 3: every index in one commit, or none ------------------------------------------

def test_all_indices_get_hello_in_one_publication(image: Path, tmp_path: Path) -> None:
    generation = info(image)["generation"]
    out = here("package", "add", image, "all", HELLO).stdout.decode()
    assert "Committed indexes 1 (one), 2 (two) in one commit." in out, out
    doc = info(image)
    assert doc["generation"] == generation + 1  # one publication for both
    for entry in doc["indices"]:
        last = entry["history"][-1]
        assert last["action"] == "package add", last
        assert last["arguments"]["debs"] == [str(HELLO)]
        assert [(p["package"], p["version"], p["state"])
                for p in last["result"]["added"]] == [("hello", "2.10-3", "installed")]
        assert "via" not in last
    assert dpkg_states(image, tmp_path, "hello", 1, 2) == ["ii", "ii"]


def test_a_failure_in_index_2_leaves_both_as_they_were(image: Path, tmp_path: Path) -> None:
    """Index 2's dpkg database says bash owns /usr/bin/hello: its dpkg refuses to unpack
    hello over it (found when applying, not when planning).  Index 1, serviced first and
    successfully, is not published either."""
    mnt = tmp_path / "rw"
    with mounted_rw(image, "2", mnt):
        with open(mnt / "var/lib/dpkg/info/bash.list", "a") as fh:
            fh.write("/usr/bin/hello\n")
        run_imagefs("commit", mnt)
    before = sha(image)
    r = here("package", "add", image, "all", HELLO, check=False)
    err = r.stderr.decode().splitlines()
    assert r.returncode == 9, err
    assert err[0].startswith("imagefs: index 2 (two): dpkg --install failed: "), err
    assert "trying to overwrite '/usr/bin/hello', which is also in package bash" in err[0]
    assert err[0].endswith("; nothing was changed"), err
    assert all(line.startswith("  | ") for line in err[1:]) and len(err) > 1, err
    assert r.stdout == b""
    assert sha(image) == before
    assert dpkg_states(image, tmp_path, "hello", 1, 2) == ["", ""]
    assert [e["history"][-1]["action"] for e in info(image)["indices"]] == [
        "capture", "commit"]


# -- item 7: the servicing methods through a real daemon ---------------------------------

def test_add_and_remove_through_the_daemon(d: DaemonProcess, image: Path,
                                           tmp_path: Path) -> None:
    generation = info(image)["generation"]
    out = via(d, "package", "add", image, "1", HELLO).stdout.decode()
    assert "install hello 2.10-3" in out and "Committed index 1 (one) in one commit." in out
    last = last_entry(image, 1)
    assert last["action"] == "package add" and last["via"] == "daemon", last
    assert last["method"] == "packages.add" and last["uid"] == 0, last
    assert last["params"]["debs"] == [str(HELLO)] and last["params"]["index"] == "1", last
    assert last["result"]["added"][0]["package"] == "hello"
    assert dpkg_states(image, tmp_path, "hello", 1, 2) == ["ii", ""]

    doc = json.loads(via(d, "package", "remove", image, "1", "hello", "--json").stdout)
    assert doc["committed"] and not doc["dry_run"], doc
    assert [(p["package"], p["state"]) for p in doc["indices"][0]["result"]["removed"]] == [
        ("hello", "removed")]
    last = last_entry(image, 1)
    assert (last["action"], last["via"], last["method"]) == (
        "package remove", "daemon", "packages.remove"), last
    assert info(image)["generation"] == generation + 2
    assert dpkg_states(image, tmp_path, "hello", 1) in (["rc"], [""])
    assert hello_state(image) == "old"


def test_dry_run_through_the_daemon_changes_nothing(d: DaemonProcess, image: Path) -> None:
    before = sha(image)
    out = via(d, "package", "add", image, "all", HELLO, "--dry-run").stdout.decode()
    assert out.count("install hello 2.10-3 (amd64") == 2, out
    assert out.endswith("Dry run: nothing was changed.\n"), out
    assert here("package", "add", image, "all", HELLO, "--dry-run").stdout.decode() == out
    assert sha(image) == before


def test_a_refusal_is_the_same_with_and_without_the_daemon(d: DaemonProcess,
                                                           image: Path) -> None:
    before = sha(image)
    answers = [via(d, "package", "add", image, "1", JQ, check=False),
               here("package", "add", image, "1", JQ, check=False)]
    for r in answers:
        assert r.returncode == 2, r.stderr
        assert r.stdout == b""
    err = answers[0].stderr.decode()
    assert err == answers[1].stderr.decode()
    assert err == ("imagefs: index 1 (one): jq 1.6-2.1+deb12u3 needs libjq1 "
                   "(= 1.6-2.1+deb12u3), which neither the image nor the given packages "
                   "provide\n"), err
    assert sha(image) == before


def test_a_failing_postinst_through_the_daemon(d: DaemonProcess, image: Path,
                                               tmp_path: Path) -> None:
    failing = build_deb(tmp_path, "failing", {
        "postinst": "#!/bin/sh\necho 'postinst of failing: refusing to configure'\n"
                    "echo 'on stderr too' >&2\nexit 1\n"})
    before = sha(image)
    r = via(d, "package", "add", image, "1", failing, check=False)
    err = r.stderr.decode().splitlines()
    assert r.returncode == 9, err
    assert err[0] == FAILING_FIRST_LINE, err
    assert all(line.startswith("  | ") for line in err[1:]), err
    assert "  | postinst of failing: refusing to configure" in err
    assert "  | on stderr too" in err
    assert r.stdout == b""
    assert sha(image) == before
    alone = here("package", "add", image, "1", failing, check=False)
    assert (alone.returncode, alone.stderr.decode().splitlines()) == (9, err)
    assert sha(image) == before


def test_firstboot_through_the_daemon(d: DaemonProcess, image: Path) -> None:
    via(d, "firstboot", "add", image, "1", "--command", "echo hello from first boot",
        "--name", "greet")
    last = last_entry(image, 1)
    assert (last["action"], last["via"], last["method"]) == (
        "firstboot add", "daemon", "firstboot.add"), last
    shown = json.loads(via(d, "firstboot", "list", image, "1", "--json").stdout)
    assert [(i["name"], i["state"]) for i in shown["items"]] == [("greet", "queued")]
    assert shown["pending"] == 1
    with Client(str(d.sock), timeout=60) as c:
        listed = c.call("firstboot.list", image=str(image), index=1)
    assert (listed["index"], listed["name"], listed["pending"]) == (1, "one", 1), listed
    assert listed["items"] == shown["items"]
    assert json.loads(here("firstboot", "list", image, "2", "--json").stdout)["items"] == []

    via(d, "firstboot", "remove", image, "1", "greet")
    assert last_entry(image, 1)["method"] == "firstboot.remove"
    with Client(str(d.sock), timeout=60) as c:
        listed = c.call("firstboot.list", image=str(image), index="one")
    assert listed["pending"] == 0 and not [i for i in listed["items"]
                                           if i["state"] == "queued"], listed


def test_health_scan_and_check_through_the_daemon(d: DaemonProcess, image: Path) -> None:
    before = sha(image)
    r = via(d, "health", "check", image, "1", check=False)
    assert r.returncode == 3 and b"never-scanned" in r.stdout, r.stdout
    scan = via(d, "health", "scan", image, "1", "--json", check=False)
    assert scan.returncode == 0, scan.stdout.decode() + scan.stderr.decode()
    report = json.loads(scan.stdout)
    assert report["healthy"] is True and report["index"] == 1, report
    r = via(d, "health", "check", image, "1")
    assert r.stdout.decode().startswith("index 1 (one): healthy: "), r.stdout
    with Client(str(d.sock), timeout=60) as c:
        answer = c.call("health.check", image=str(image), index=1)
    assert (answer["status"], answer["exit_code"]) == ("healthy", 0), answer
    assert sha(image) == before  # a scan looks in a session that is discarded


def test_only_root_may_run_the_images_programs(d: DaemonProcess, image: Path) -> None:
    """A member of the daemon's group is refused, before anything is looked at, every
    method that would run the image's dpkg as root; through the CLI too."""
    before = sha(image)
    where = {"image": str(image), "index": 1}
    for method, params in (("packages.add", {"debs": [str(HELLO)]}),
                           ("packages.remove", {"names": ["hello"]}),
                           ("health.scan", {}),
                           ("health.restore", {"source": f"{image}:2"})):
        r = call_as(d.sock, MEMBER, [TEST_GID], method, **where, **params)
        assert r == {"error": {"code": INVALID_PARAMS, "message": f"{method}: {ROOT_ONLY}"}}, r
    cli = as_user(MEMBER, [TEST_GID], lambda: cli_here(
        d, "package", "add", str(image), "1", str(HELLO), "--daemon"))
    code, out, err = cli["result"]
    assert (out, err) == ("", f"imagefs: packages.add: {ROOT_ONLY}\n") and code != 0, cli
    assert sha(image) == before


def test_job_progress_comes_before_done(d: DaemonProcess, image: Path) -> None:
    with Client(str(d.sock), timeout=120) as c:
        job = c.call("packages.add", image=str(image), index=1, debs=[str(HELLO)],
                     subscribe=True)
        assert job["state"] in ("queued", "running") and job["method"] == "packages.add"
        seen: list[tuple[str, dict[str, Any]]] = []
        while not seen or seen[-1][0] != "job.done":
            method, params = c.next_notification()
            if params.get("job") == job["job"]:
                seen.append((method, params))
    progress = [p for m, p in seen if m == "job.progress"]
    done = seen[-1][1]
    assert progress and all(m == "job.progress" for m, _p in seen[:-1]), seen
    assert any(p["state"] == "running" and p["done"] >= 1 for p in progress), progress
    assert {p["unit"] for p in progress if p["done"]} == {"steps"}, progress
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert done["state"] == "done" and done["result"]["committed"] is True, done
    assert hello_state(image) == "new" and hello_state(image, "2") == "old"


def finish_cancelled(c: Client, job: dict[str, Any], image: Path, before: str) -> str:
    """Follow a cancelled job to its end: 'cancelled' (the image byte for byte as it was)
    or, when the cancel came too late, 'done' (hello wholly installed)."""
    end = c.wait_job(job["job"])
    assert end["state"] in ("cancelled", "done"), end
    if end["state"] == "cancelled":
        assert end["error"]["message"] == "cancelled; nothing was changed", end
        assert sha(image) == before
        assert hello_state(image) == "old"
    else:
        assert hello_state(image) == "new"
    assert run_imagefs("verify", image).returncode == 0
    return str(end["state"])


def cancel(c: Client, job: dict[str, Any]) -> None:
    """jobs.cancel; refused (-32409) only when the job already publishes or is over."""
    try:
        c.call("jobs.cancel", job=job["job"])
    except RpcError as e:
        assert e.code == -32409, e


def test_cancel_at_once(d: DaemonProcess, image: Path) -> None:
    before = sha(image)
    with Client(str(d.sock), timeout=120) as c:
        job = c.call("packages.add", image=str(image), index=1, debs=[str(HELLO)],
                     dry_run=False)
        cancel(c, job)
        finish_cancelled(c, job, image, before)


def test_cancel_while_the_index_is_serviced(d: DaemonProcess, image: Path) -> None:
    """Cancelled as soon as the session of the index is mounted (dpkg runs next, for about
    a second): the cancel lands at the next step, the session is discarded and its mount
    ends."""
    before = sha(image)
    with Client(str(d.sock), timeout=120) as c:
        job = c.call("packages.add", image=str(image), index=1, debs=[str(HELLO)])
        assert wait_until(lambda: workspace_mounts() != [], 60, 0.005)
        cancel(c, job)
        state = finish_cancelled(c, job, image, before)
    assert state == "cancelled"


def workspace_mounts() -> list[str]:
    """The mounts of servicing workspaces (the daemon's transactions), sorted."""
    base = os.path.join(run_dir(), "servicing") + "/"
    return sorted(m for m in kernel_imagefs_mounts() if m.startswith(base))


def test_a_cancel_just_before_the_commit_ends_cancelled(d: DaemonProcess,
                                                        image: Path) -> None:
    """The cancel comes after the last step ('checking and committing'), while the mounts
    of the serviced indices are detached, before the commit starts (seen here: index 1's
    mount is gone, index 2's is still there).  The job is still cancellable, so the cancel
    is accepted, and the job must then end `cancelled`, having changed nothing, as
    docs/api.md says of every accepted cancel (not `failed` with "interrupted")."""
    before = sha(image)
    with Client(str(d.sock), timeout=120) as c:
        job = c.call("packages.add", image=str(image), index="all", debs=[str(HELLO)])
        assert wait_until(lambda: len(workspace_mounts()) == 2, 60, 0.005)
        opened = workspace_mounts()
        assert [m.rsplit("/", 1)[1] for m in opened] == ["1", "2"], opened
        assert wait_until(lambda: workspace_mounts() != opened, 60, 0.001)
        assert workspace_mounts() == opened[1:], "index 2's mount went first"
        try:
            c.call("jobs.cancel", job=job["job"])
        except RpcError as e:  # too late after all: the commit had started
            assert e.code == -32409, e
            pytest.skip("the commit started before the cancel came")
        end = c.wait_job(job["job"])
    assert sha(image) == before
    assert (end["state"], end["error"]) == ("cancelled", {
        "code": -32000, "message": "cancelled; nothing was changed"}), end
