"""The daemon as a process of its own (`imagefs daemon` in a child): SIGKILL during a commit
and a restart, SIGTERM during jobs, mounts that outlive a killed daemon, and the CLI's
verbs going through a listening daemon."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import kernel_imagefs_mounts, pid_alive, run_imagefs, wait_until
from daemon_helpers import big_tree, daemon_process, end_sessions, is_mounted, two_index_image

from daemon.client import Client


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    return two_index_image(tmp_path)


# --- crash, restart, shutdown -------------------------------------------------------------

def test_sigkill_during_commit_then_restart_and_remount(tmp_path: Path,
                                                        small_image: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    before = run_imagefs("info", small_image, "--json").stdout
    try:
        with daemon_process(tmp_path) as d:
            with Client(str(d.sock), timeout=60) as c:
                s = c.call("sessions.open", image=str(small_image), index=1,
                           mountpoint=str(mnt))
                for k in range(300):
                    (mnt / f"n{k}").write_bytes(os.urandom(16 << 10))
                os.sync()
                fd = os.open(mnt, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                c.call("sessions.commit", session=s["session"])
                time.sleep(0.05)
                # What systemd does when the daemon dies (KillMode): everything goes.
                os.kill(s["pid"], signal.SIGKILL)
                d.kill(signal.SIGKILL)
            assert wait_until(lambda: not pid_alive(s["pid"]), 10)
            assert wait_until(lambda: not is_mounted(mnt), 10)
        run_imagefs("verify", small_image)
        after = json.loads(run_imagefs("info", small_image, "--json").stdout)
        files = after["indices"][0]["files"]
        assert files in (json.loads(before)["indices"][0]["files"], 302), files
        with daemon_process(tmp_path) as d, Client(str(d.sock), timeout=60) as c:
            listed = c.call("sessions.list")
            assert [(x["session"], x["state"]) for x in listed] == [(s["session"], "stale")]
            back = c.call("sessions.remount", session=s["session"])
            assert back["state"] == "live" and len(list(mnt.glob("n*"))) == 300
            job = c.call("sessions.commit", session=s["session"])
            assert c.wait_job(job["job"])["state"] == "done"
            c.call("sessions.discard", session=s["session"])
        run_imagefs("verify", small_image)
        info = json.loads(run_imagefs("info", small_image, "--json").stdout)
        assert info["indices"][0]["files"] == 302
    finally:
        end_sessions(state, tmp_path)


def test_sigterm_rolls_back_jobs_and_leaves_no_mount(tmp_path: Path,
                                                     small_image: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    src = big_tree(tmp_path / "tree", 96)
    before = small_image.read_bytes()
    state = tmp_path / "state"
    try:
        with daemon_process(tmp_path) as d:
            with Client(str(d.sock), timeout=60) as c:
                s = c.call("sessions.open", image=str(small_image), index=1,
                           mountpoint=str(mnt))
                (mnt / "kept").write_text("saved on the way down\n")
                job = c.call("images.capture", image=str(small_image), source=str(src),
                             name="big", subscribe=True)
                while c.next_notification()[1]["state"] != "running":
                    pass
                assert d.kill(signal.SIGTERM) == 0
            assert not d.sock.exists()
            assert not [m for m in kernel_imagefs_mounts() if m.startswith(str(tmp_path))]
            assert not pid_alive(s["pid"])
        assert small_image.read_bytes() == before, job
        with daemon_process(tmp_path) as d, Client(str(d.sock), timeout=60) as c:
            assert [x["state"] for x in c.call("sessions.list")] == ["stale"]
            c.call("sessions.remount", session=s["session"])
            assert (mnt / "kept").read_text() == "saved on the way down\n"
            c.call("sessions.discard", session=s["session"])
    finally:
        end_sessions(state, tmp_path)


# --- the CLI through the daemon ---------------------------------------------------------

def test_cli_verbs_go_through_a_listening_daemon(tmp_path: Path, small_image: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    try:
        with daemon_process(tmp_path) as d:
            env = {"IMAGEFS_SOCKET": str(d.sock), "IMAGEFS_STATE_DIR": str(state)}
            src = tmp_path / "src"
            run_imagefs("capture", src, small_image, "--name", "third", env=env)
            rec = json.loads(run_imagefs("mount", "--rw", small_image, "third", mnt,
                                         "--json", env=env).stdout)
            assert rec["session"] and is_mounted(mnt)
            (mnt / "etc" / "motd").write_text("through the daemon\n")
            done = json.loads(run_imagefs("commit", mnt, "--json", env=env).stdout)
            assert done["changed"] is True and done["mountpoint"] == str(mnt)
            run_imagefs("unmount", mnt, "--commit", env=env)
            assert not is_mounted(mnt)
            run_imagefs("export", small_image, "third", tmp_path / "out.imagefs", env=env)
            run_imagefs("delete", small_image, "second", env=env)
            info = json.loads(run_imagefs("info", small_image, "--history", "--json",
                                          env=env).stdout)
            third = info["indices"][-1]
            assert [i["name"] for i in info["indices"]] == ["base", "third"]
            assert [(h["action"], h.get("via")) for h in third["history"]] == [
                ("capture", "daemon"), ("commit", "daemon")]
            with Client(str(d.sock)) as c:
                methods = [j["method"] for j in c.call("jobs.list")]
            assert methods == ["images.capture", "sessions.commit", "sessions.commit",
                               "images.export"]
            # --no-daemon works directly; --daemon with none listening is one clear error.
            run_imagefs("delete", small_image, "third", "--no-daemon", env=env)
        out = tmp_path / "out.imagefs"
        gone = run_imagefs("delete", out, "1", "--daemon", check=False,
                           env={"IMAGEFS_SOCKET": str(tmp_path / "none.sock")})
        assert gone.returncode == 8
        assert gone.stderr.decode().count("\n") == 1 and b"no imagefs daemon" in gone.stderr
        run_imagefs("verify", out)
    finally:
        end_sessions(state, tmp_path)


def test_mounts_outlive_a_killed_daemon_and_are_adopted(tmp_path: Path,
                                                        small_image: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    state = tmp_path / "state"
    try:
        with daemon_process(tmp_path) as d, Client(str(d.sock), timeout=60) as c:
            s = c.call("sessions.open", image=str(small_image), index=1, mountpoint=str(mnt))
            (mnt / "during").write_text("written while the daemon was down\n")
            d.kill(signal.SIGKILL)
        assert is_mounted(mnt) and pid_alive(s["pid"])
        (mnt / "after").write_text("still served\n")
        with daemon_process(tmp_path) as d:
            with Client(str(d.sock), timeout=60) as c:
                assert [(x["session"], x["state"]) for x in c.call("sessions.list")] == [
                    (s["session"], "live")]
                job = c.call("sessions.commit", session=s["session"])
                assert c.wait_job(job["job"])["state"] == "done"
            assert d.kill(signal.SIGTERM) == 0  # stops the adopted mount too
        assert not is_mounted(mnt) and not pid_alive(s["pid"])
        info = json.loads(run_imagefs("info", small_image, "--json").stdout)
        assert info["indices"][0]["files"] == 4
    finally:
        end_sessions(state, tmp_path)
