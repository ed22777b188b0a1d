"""The drivers.* daemon methods (issue 15, item 5) through a real `imagefs daemon` process:
drivers.check and drivers.list answer as the CLI without the daemon does; drivers.add and
drivers.remove are jobs whose outcome is the same as the CLI's, with the daemon in the
index's history; a refusal keeps its one line and exit code; a member of the daemon's
group who is not root is refused add and remove.  Afterwards nothing of the work is left
(mounts, workspaces, containers, the daemon's sessions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_imagefs, servicing_leftovers
from daemon_helpers import TEST_GID, DaemonProcess, call_as, daemon_process, end_sessions
from drivers_helpers import (
    HARDWARE,
    NEEDS_KERNEL,
    REPOSITORY,
    WRONG,
    image_copy,
    kernel_image,
    readme_tables,
    sha,
)

from daemon.client import Client
from daemon.protocol import INVALID_PARAMS, RpcError
from imagefs.places import run_dir

pytestmark = [NEEDS_KERNEL]
NUC = HARDWARE / "nuc-13-pro.json"
NUC_MODULES = ["ifs_demo_nic", "ifs_demo_core", "ifs_demo_wifi"]
MEMBER = 47312  # a member of the daemon's group, not root
ROOT_ONLY = ("runs the image's own programs as root in a container; only root may ask "
             "for it")


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="imagefs-drvd-"))
    root.chmod(0o755)
    try:
        with daemon_process(root, "--group", str(TEST_GID)) as daemon:
            yield daemon
        end_sessions(daemon.state, Path(run_dir()) / "servicing")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def nothing_left(d: DaemonProcess) -> Iterator[None]:
    yield
    assert d.proc is not None and d.proc.poll() is None, d.log.read_text()[-4000:]
    assert servicing_leftovers() == []
    sessions = d.state / "sessions"
    assert not sessions.is_dir() or not list(sessions.iterdir())


def via(d: DaemonProcess, *args: str | Path, check: bool = True
        ) -> subprocess.CompletedProcess[bytes]:
    return run_imagefs(*args, "--daemon", check=check, env={"IMAGEFS_SOCKET": str(d.sock)})


def names(doc: dict, repository: bool = False) -> list[list[str]]:
    devices = doc["inventories"][0]["kernels"][0]["devices"]
    return [d["with_repository"] if repository else [m["name"] for m in d["modules"]]
            for d in devices]


def test_check_and_list_answer_as_without_the_daemon(d: DaemonProcess) -> None:
    image = kernel_image()
    args = ("driver", "check", str(image), "1", "--hardware", str(NUC), "--repository",
            str(REPOSITORY), "--json")
    there = via(d, *args, check=False)
    here = run_imagefs(*args, "--no-daemon", check=False)
    assert there.returncode == here.returncode == 1
    assert json.loads(there.stdout) == json.loads(here.stdout)
    table = readme_tables()["nuc-13-pro"]
    assert names(json.loads(there.stdout), True) == [w for _a, _k, w in table]
    listed = via(d, "driver", "list", str(image), "1", "--json")
    assert json.loads(listed.stdout)["drivers"] == []
    with Client(str(d.sock), timeout=60) as c:
        doc = c.call("drivers.check", image=str(image), index=1,
                     hardware=[str(HARDWARE / "qemu-vm.json")])
        assert doc["ok"] and doc["inventories"][0]["kernels"][0]["covered"] == 9
        with pytest.raises(RpcError) as e:
            c.call("drivers.check", image=str(image), index=1, hardware=["nuc.json"])
        assert e.value.code == INVALID_PARAMS


def test_add_and_remove_are_jobs(d: DaemonProcess, tmp_path: Path) -> None:
    image = image_copy(tmp_path)
    before = sha(image)
    refused = via(d, "driver", "add", str(image), "1", "--path", str(WRONG), check=False)
    err = refused.stderr.decode()
    assert refused.returncode == 2 and "6.1.0-57-amd64" in err and len(err.splitlines()) == 1
    assert sha(image) == before
    via(d, "driver", "add", str(image), "1", "--repository", str(REPOSITORY), "--hardware",
        str(NUC))
    table = readme_tables()["nuc-13-pro"]
    check = via(d, "driver", "check", str(image), "1", "--hardware", str(NUC), "--json",
                check=False)
    assert names(json.loads(check.stdout)) == [w for _a, _k, w in table]
    history = json.loads(run_imagefs("info", image, "--json", "--history").stdout)
    last = history["indices"][0]["history"][-1]
    assert (last["action"], last["via"], last["method"]) == ("driver add", "daemon",
                                                            "drivers.add")
    listed = json.loads(via(d, "driver", "list", str(image), "1", "--json").stdout)
    assert sorted(x["name"] for x in listed["drivers"]) == sorted(NUC_MODULES)
    via(d, "driver", "remove", str(image), "1", *NUC_MODULES)
    check = via(d, "driver", "check", str(image), "1", "--hardware", str(NUC), "--json",
                check=False)
    assert names(json.loads(check.stdout)) == [k for _a, k, _w in table]


def test_only_root_may_add_and_remove(d: DaemonProcess, tmp_path: Path) -> None:
    image = image_copy(tmp_path)
    before = sha(image)
    where = {"image": str(image), "index": 1}
    for method, params in (("drivers.add", {"repository": str(REPOSITORY), "all": True}),
                           ("drivers.remove", {"names": ["ifs_demo_nic"]})):
        r = call_as(d.sock, MEMBER, [TEST_GID], method, **where, **params)
        assert r == {"error": {"code": INVALID_PARAMS, "message": f"{method}: {ROOT_ONLY}"}}, r
    assert sha(image) == before
