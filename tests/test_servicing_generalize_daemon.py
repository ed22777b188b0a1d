"""The generalize.* methods through a real `imagefs daemon` socket (issue 15, item 5):
generalize.list (plain: the operations, and what each finds in an index), generalize.run
(a job: progress, the outcome, the history entry naming the daemon), the CLI's --daemon
path giving what --no-daemon gives, and a bad --operations refused by the daemon with the
CLI's message."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_imagefs
from daemon_helpers import TEST_GID, DaemonProcess, daemon_process, end_sessions
from generalize_helpers import sha, specialised_copy, state
from servicing_helpers import NEEDS_NSPAWN
from test_servicing_daemon import left_behind

from daemon.client import Client
from daemon.protocol import INVALID_PARAMS, RpcError
from imagefs.places import run_dir

pytestmark = [NEEDS_NSPAWN]


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="imagefs-gend-"))
    root.chmod(0o755)
    try:
        with daemon_process(root, "--group", str(TEST_GID)) as daemon:
            yield daemon
        end_sessions(daemon.state, Path(run_dir()) / "servicing")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def image(d: DaemonProcess, tmp_path: Path) -> Iterator[Path]:
    yield specialised_copy(tmp_path)
    assert d.proc is not None and d.proc.poll() is None, d.log.read_text()[-4000:]
    assert left_behind(d.state) == []


def cli(d: DaemonProcess, *args: str | Path, daemon: bool = True) -> bytes:
    env = {"IMAGEFS_SOCKET": str(d.sock)}
    return run_imagefs(*args, "--daemon" if daemon else "--no-daemon", env=env).stdout


def test_list_through_the_daemon(d: DaemonProcess, image: Path) -> None:
    with Client(str(d.sock), timeout=60) as c:
        bare = c.call("generalize.list")
        found = c.call("generalize.list", image=str(image), index=1,
                       operations="-logfiles")
        for params, says in (({"operations": "nosuch"}, "unknown operation 'nosuch'"),
                             ({"image": str(image)}, "both `image` and `index`")):
            with pytest.raises(RpcError) as e:
                c.call("generalize.list", **params)
            assert e.value.code == INVALID_PARAMS and says in e.value.message, e.value
    assert bare == json.loads(cli(d, "generalize", "--list", "--json", daemon=False))
    assert found == json.loads(cli(d, "generalize", image, "1", "--list", "--json",
                                   "--operations=-logfiles", daemon=False))
    assert found["found"]["shell-history"]["paths"] == 5 and found["index"] == 1
    assert found == json.loads(cli(d, "generalize", image, "1", "--list", "--json",
                                   "--operations=-logfiles"))


def test_run_as_a_job(d: DaemonProcess, image: Path) -> None:
    with Client(str(d.sock), timeout=120) as c:
        with pytest.raises(RpcError) as e:
            c.call("generalize.run", image=str(image), index=1, operations="a,,b")
        assert e.value.code == INVALID_PARAMS, e.value
        assert "generalize.run: --operations: unknown operation 'a'" in e.value.message
        job = c.call("generalize.run", image=str(image), index=1,
                     new_index="generalized", subscribe=True)
        assert job["method"] == "generalize.run"
        seen: list[tuple[str, dict[str, Any]]] = []
        while not seen or seen[-1][0] != "job.done":
            method, params = c.next_notification()
            if params.get("job") == job["job"]:
                seen.append((method, params))
    done = seen[-1][1]
    assert done["state"] == "done" and done["result"]["committed"], done
    assert any(m == "job.progress" and p["done"] >= 1 for m, p in seen[:-1]), seen
    result = done["result"]["indices"][0]["result"]
    assert result["paths_removed"] > 40 and result["items_queued"] == 2
    assert state(image, "1") == "old" and state(image, "2") == "new"
    info = json.loads(run_imagefs("info", image, "2", "--json", "--history").stdout)
    last = info["indices"][0]["history"][-1]
    assert (last["action"], last["via"], last["method"]) == (
        "generalize", "daemon", "generalize.run"), last
    assert last["result"] == result


def test_the_cli_through_the_daemon_says_the_same(d: DaemonProcess, image: Path) -> None:
    before = sha(image)
    via = cli(d, "generalize", image, "1", "--dry-run", "--operations", "tmp-files,logfiles")
    here = cli(d, "generalize", image, "1", "--dry-run", "--operations", "tmp-files,logfiles",
               daemon=False)
    assert via == here and b"remove /var/log/syslog" in via
    assert via.endswith(b"Dry run: nothing was changed.\n")
    assert sha(image) == before
    out = cli(d, "generalize", image, "1").decode()
    assert "Committed index 1 (specialised) in one commit." in out
    assert state(image) == "new"
