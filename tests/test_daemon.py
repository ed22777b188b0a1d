"""The daemon with real sockets: jobs, access by uid, sessions, hostile clients.  The tests
run serve() in the test's trio loop (pytest-trio); test_daemon_restart.py has those that
crash, stop and restart `imagefs daemon` in a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import trio
from conftest import pid_alive, run_imagefs, wait_until
from daemon_helpers import (
    NOBODY,
    OTHER_GID,
    TEST_GID,
    big_tree,
    call_as_async,
    client,
    daemon_in_process,
    end_sessions,
    is_mounted,
    public_dir,
    raw_exchange,
    two_index_image,
)

from daemon.protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    LINE_TOO_LONG,
    METHOD_NOT_FOUND,
    NO_SUCH_JOB,
    PARSE_ERROR,
    PERMISSION_DENIED,
    RpcError,
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Sessions of this test in a state dir of its own."""
    d = tmp_path / "state"
    monkeypatch.setenv("IMAGEFS_STATE_DIR", str(d))
    return d


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    return two_index_image(tmp_path)


async def still_serves(sock: Path) -> None:
    async with client(sock) as c:
        assert (await c.call("daemon.status"))["pid"] == os.getpid()


# --- jobs -------------------------------------------------------------------------------------

@pytest.mark.trio
async def test_job_progress_and_result(tmp_path: Path, state: Path) -> None:
    src = big_tree(tmp_path / "tree", 16)
    image = tmp_path / "j.imagefs"
    async with daemon_in_process(tmp_path / "d.sock"), client(tmp_path / "d.sock") as c:
        job = await c.call("images.capture", image=str(image), source=str(src), name="t",
                           subscribe=True)
        assert job["state"] == "queued" and job["job"].startswith("j")
        notes = []
        while True:
            method, params = await c.next_notification()
            notes.append((method, params))
            if method == "job.done":
                break
        assert notes[0][0] == "job.progress"
        done = notes[-1][1]
        assert done["state"] == "done", done
        assert done["result"]["files"] == 2 and done["result"]["bytes"] == 16 << 20
        got = await c.call("jobs.get", job=job["job"])
        assert got["state"] == "done" and got["progress"]["done"] >= 16 << 20
        listed = await c.call("jobs.list")
        assert [j["job"] for j in listed] == [job["job"]]
        info = await c.call("images.info", image=str(image), index="t", history=True)
        entry = info["indices"][0]["history"][-1]
        assert entry["method"] == "images.capture" and entry["uid"] == 0
        assert entry["params"]["source"] == str(src) and entry["result"]["files"] == 2


@pytest.mark.trio
async def test_cancelled_capture_leaves_the_image_as_it_was(tmp_path: Path, state: Path,
                                                            small_image: Path) -> None:
    src = big_tree(tmp_path / "tree")
    before = small_image.read_bytes()
    async with daemon_in_process(tmp_path / "d.sock"), client(tmp_path / "d.sock") as c:
        job = await c.call("images.capture", image=str(small_image), source=str(src),
                           name="big", subscribe=True)
        method, params = await c.next_notification()  # running
        assert params["state"] == "running"
        await c.call("jobs.cancel", job=job["job"])
        done = await c.call("jobs.wait", job=job["job"], timeout=60)
        assert done["state"] == "cancelled", done
        with pytest.raises(RpcError) as e:
            await c.call("jobs.cancel", job=job["job"])
        assert "cancelled" in e.value.message
    assert small_image.read_bytes() == before
    run_imagefs("verify", small_image)


@pytest.mark.trio
async def test_cancelled_export_leaves_no_dest(tmp_path: Path, state: Path) -> None:
    image = tmp_path / "e.imagefs"
    run_imagefs("capture", big_tree(tmp_path / "tree"), image, "--name", "big", "--level", "1")
    dest = tmp_path / "out.imagefs"
    async with daemon_in_process(tmp_path / "d.sock"), client(tmp_path / "d.sock") as c:
        job = await c.call("images.export", image=str(image), index="all", dest=str(dest),
                           subscribe=True)
        await c.next_notification()
        await c.call("jobs.cancel", job=job["job"])
        done = await c.call("jobs.wait", job=job["job"], timeout=60)
        assert done["state"] == "cancelled", done
        assert not dest.exists() and os.listdir(tmp_path).count("out.imagefs") == 0
        # The same export, left alone, gives a file verify finds clean.
        job = await c.call("images.export", image=str(image), index=[1], dest=str(dest))
        assert (await c.call("jobs.wait", job=job["job"]))["state"] == "done"
    run_imagefs("verify", dest)


@pytest.mark.trio
async def test_a_client_that_disconnects_does_not_stop_its_job(tmp_path: Path, state: Path,
                                                               small_image: Path) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock):
        async with client(sock) as c:
            job = await c.call("images.verify", image=str(small_image), subscribe=True)
        async with client(sock) as other:
            done = await other.call("jobs.wait", job=job["job"], timeout=60)
        assert done["state"] == "done" and done["result"]["ok"] is True


# --- access -----------------------------------------------------------------------------------

@pytest.mark.trio
async def test_only_root_and_the_group_are_served(state: Path) -> None:
    pub = public_dir("imagefs-d-")
    sock = pub / "d.sock"
    async with daemon_in_process(sock):
        st = os.stat(sock)
        assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == TEST_GID
        member = await call_as_async(sock, NOBODY, [TEST_GID], "daemon.status")
        assert member["result"]["peer"]["uid"] == NOBODY
        # Not in the group: the socket's mode already keeps it out...
        outsider = await call_as_async(sock, NOBODY, [OTHER_GID], "daemon.status")
        assert outsider.get("oserror") == 13, outsider
        # ...and with the socket opened up, SO_PEERCRED still does.
        os.chmod(sock, 0o666)
        outsider = await call_as_async(sock, NOBODY, [OTHER_GID], "daemon.status")
        assert outsider["error"]["code"] == PERMISSION_DENIED, outsider
        await still_serves(sock)


@pytest.mark.trio
async def test_paths_are_checked_as_the_caller(state: Path, small_image: Path) -> None:
    pub = public_dir("imagefs-d-")
    sock = pub / "d.sock"
    secret = Path(public_dir("imagefs-secret-"))
    os.chmod(secret, 0o700)
    (secret / "x.imagefs").write_bytes(small_image.read_bytes())
    mine = pub / "mine"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    (mine / "link.imagefs").symlink_to(secret / "x.imagefs")
    ok_image = mine / "ok.imagefs"
    ok_image.write_bytes(small_image.read_bytes())
    os.chown(ok_image, NOBODY, NOBODY)

    async def as_member(method: str, **params: object) -> dict:
        return await call_as_async(sock, NOBODY, [TEST_GID], method, **params)

    async with daemon_in_process(sock):
        ok = await as_member("images.info", image=str(ok_image))
        assert ok["result"]["indices"][0]["name"] == "base"
        for path, code in [("small.imagefs", INVALID_PARAMS),             # relative
                           (f"{mine}/../mine/ok.imagefs", INVALID_PARAMS),  # ..
                           (str(mine / "link.imagefs"), PERMISSION_DENIED),  # symlink out
                           (str(secret / "x.imagefs"), PERMISSION_DENIED)]:
            r = await as_member("images.info", image=path)
            assert r["error"]["code"] == code, (path, r)
        # Export over a file the caller may not write, or into a directory it may not.
        r = await as_member("images.export", image=str(ok_image), index=1,
                            dest=str(secret / "y.imagefs"))
        assert r["error"]["code"] == PERMISSION_DENIED, r
        r = await as_member("images.capture", image=str(mine / "new.imagefs"),
                            source=str(secret), name="steal")
        assert r["error"]["code"] == PERMISSION_DENIED, r
        assert not (mine / "new.imagefs").exists()
        # A readable directory with a root-only file inside: the work itself runs as the
        # caller, so the kernel refuses that file and nothing is captured.
        tree = pub / "tree"
        (tree / "open").mkdir(parents=True)
        (tree / "open" / "readme").write_text("anyone\n")
        (tree / "shadow").write_text("root only\n")
        os.chmod(tree / "shadow", 0o600)
        new = mine / "new.imagefs"
        r = await as_member("images.capture", image=str(new), source=str(tree), name="t")
        done = await as_member("jobs.wait", job=r["result"]["job"])
        assert done["result"]["state"] == "failed", done
        assert "shadow" in done["result"]["error"]["message"], done
        assert not new.exists() or json.loads(run_imagefs("info", new, "--json").stdout)[
            "indices"] == []
        os.chmod(tree / "shadow", 0o644)
        r = await as_member("images.capture", image=str(new), source=str(tree), name="t")
        done = await as_member("jobs.wait", job=r["result"]["job"])
        assert done["result"]["state"] == "done", done
        assert os.stat(new).st_uid == NOBODY  # made by the caller, as the caller
        await still_serves(sock)


@pytest.mark.trio
async def test_a_session_belongs_to_its_owner(state: Path, small_image: Path) -> None:
    pub = public_dir("imagefs-d-")
    sock = pub / "d.sock"
    image = pub / "owned.imagefs"
    image.write_bytes(small_image.read_bytes())
    os.chown(image, NOBODY, NOBODY)
    mnt = pub / "mnt"
    mnt.mkdir()
    os.chown(mnt, NOBODY, NOBODY)
    other_uid = NOBODY - 1
    try:
        async with daemon_in_process(sock):
            opened = await call_as_async(sock, NOBODY, [TEST_GID], "sessions.open",
                                         image=str(image), index=1, mountpoint=str(mnt))
            assert "result" in opened, opened
            sid = opened["result"]["session"]
            assert opened["result"]["owner"] == NOBODY and is_mounted(mnt)
            # Root's mount for a member: no setuid programs or device nodes that work.
            assert {"nosuid", "nodev"} <= mount_options(mnt), mount_options(mnt)
            for method in ("sessions.commit", "sessions.discard", "sessions.remount"):
                r = await call_as_async(sock, other_uid, [TEST_GID], method, session=sid)
                assert r["error"]["code"] == -32003, (method, r)  # no such session
            listed = await call_as_async(sock, other_uid, [TEST_GID], "sessions.list")
            assert listed["result"] == []
            async with client(sock) as root:
                assert [s["session"] for s in await root.call("sessions.list")] == [sid]
            r = await call_as_async(sock, NOBODY, [TEST_GID], "sessions.discard", session=sid)
            assert r["result"]["discarded"] is True, r
            assert not is_mounted(mnt)
    finally:
        end_sessions(state, pub)


def mount_options(mnt: Path) -> set[str]:
    """The per-mount options /proc/self/mountinfo shows for mnt."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split(" ")
            if parts[4] == str(mnt):
                return set(parts[5].split(","))
    return set()


# --- sessions ---------------------------------------------------------------------------------

@pytest.mark.trio
async def test_session_open_commit_remount_discard(tmp_path: Path, state: Path,
                                                   small_image: Path) -> None:
    sock = tmp_path / "d.sock"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        async with daemon_in_process(sock), client(sock) as c:
            before = await c.call("images.info", image=str(small_image))
            s = await c.call("sessions.open", image=str(small_image), index="base",
                             mountpoint=str(mnt))
            assert s["state"] == "live" and is_mounted(mnt)
            await trio.to_thread.run_sync((mnt / "etc" / "hostname").write_text, "edited\n")
            job = await c.call("sessions.commit", session=s["session"], new_index="edited")
            done = await c.call("jobs.wait", job=job["job"], timeout=60)
            assert done["state"] == "done" and done["result"]["name"] == "edited", done
            after = await c.call("images.info", image=str(small_image))  # not a stale answer
            assert [i["name"] for i in after["indices"]] == [
                *(i["name"] for i in before["indices"]), "edited"]
            info = await c.call("images.info", image=str(small_image), index="edited",
                                history=True)
            h = info["indices"][0]["history"][-1]
            assert h["action"] == "commit" and h["method"] == "sessions.commit"
            # Crash the mount: the session is stale, remount brings it back.
            os.kill(s["pid"], signal.SIGKILL)
            assert await trio.to_thread.run_sync(lambda: wait_until(
                lambda: not pid_alive(s["pid"]), 10))
            listed = await c.call("sessions.list")
            assert [x["state"] for x in listed] == ["stale"]
            back = await c.call("sessions.remount", session=s["session"])
            assert back["state"] == "live"
            assert (mnt / "etc" / "hostname").read_text() == "edited\n"
            await c.call("sessions.discard", session=s["session"])
            assert not is_mounted(mnt) and await c.call("sessions.list") == []
            diff = await c.call("images.diff", image=str(small_image), index=1,
                                other="edited")
            assert diff["summary"] == {"added": 0, "removed": 0, "changed": 1}, diff
    finally:
        end_sessions(state, tmp_path)


@pytest.mark.trio
async def test_many_clients_while_two_indices_commit(tmp_path: Path, state: Path,
                                                     small_image: Path) -> None:
    sock = tmp_path / "d.sock"
    mounts = [tmp_path / "m1", tmp_path / "m2"]
    try:
        async with daemon_in_process(sock), client(sock) as c:
            sessions = []
            for i, m in enumerate(mounts, 1):
                m.mkdir()
                sessions.append(await c.call("sessions.open", image=str(small_image),
                                             index=i, mountpoint=str(m)))
                await trio.to_thread.run_sync(
                    lambda m=m: [(m / f"new{k}").write_bytes(os.urandom(4096))
                                 for k in range(200)])
            answers = []

            async def reader() -> None:
                async with client(sock) as rc:
                    for _ in range(10):
                        info = await rc.call("images.info", image=str(small_image))
                        answers.append([x["name"] for x in info["indices"]])
                        assert len(await rc.call("sessions.list")) == 2

            async with trio.open_nursery() as n:
                jobs = [await c.call("sessions.commit", session=s["session"])
                        for s in sessions]
                for _ in range(50):
                    n.start_soon(reader)
            for j in jobs:
                done = await c.call("jobs.wait", job=j["job"], timeout=120)
                assert done["state"] == "done", done
            assert len(answers) == 500 and all(a == ["base", "second"] for a in answers)
            info = await c.call("images.info", image=str(small_image))
            assert [x["files"] for x in info["indices"]] == [202, 202]
            for s in sessions:
                await c.call("sessions.discard", session=s["session"])
        run_imagefs("verify", small_image)
    finally:
        end_sessions(state, tmp_path)


# --- hostile clients --------------------------------------------------------------------------

@pytest.mark.trio
@pytest.mark.parametrize("line, code", [
    (b"{not json\n", PARSE_ERROR),
    (b"\xff\xfe\n", PARSE_ERROR),
    (b"[1, 2]\n", INVALID_REQUEST),
    (b'"a string"\n', INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "method": "daemon.status"}\n', INVALID_REQUEST),  # no id
    (b'{"jsonrpc": "2.0", "id": 1, "method": "no.such"}\n', METHOD_NOT_FOUND),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "images.info", "params": {"image": 5}}\n',
     INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "images.info", "params": {}}\n',
     INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "images.info", "params": [1]}\n',
     INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "jobs.get", "params": {"job": "j999"}}\n',
     NO_SUCH_JOB),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "jobs.wait", "params": {"job": "j1", '
     b'"timeout": true}}\n', INVALID_PARAMS),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "daemon.status", "params": {"x": 1}}\n',
     INVALID_PARAMS),
])
async def test_bad_requests_get_an_error_and_the_connection_goes_on(
        tmp_path: Path, state: Path, line: bytes, code: int) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock):
        good = b'{"jsonrpc": "2.0", "id": "after", "method": "daemon.status"}\n'
        err, ok = await raw_exchange(sock, line + good, replies=2)
        assert err["error"]["code"] == code, err
        assert ok["id"] == "after" and "result" in ok
        await still_serves(sock)


@pytest.mark.trio
async def test_a_100_mb_line_closes_only_that_connection(tmp_path: Path, state: Path) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock):
        s = await trio.open_unix_socket(str(sock))
        got = b""

        async def flood() -> None:
            block = b"x" * (1 << 20)
            try:
                for _ in range(100):
                    await s.send_all(block)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with s, trio.open_nursery() as n:
            n.start_soon(flood)
            await still_serves(sock)
            with trio.fail_after(20):
                try:  # the line's answer, then EOF (or a reset: we were still sending)
                    while chunk := await s.receive_some(65536):
                        got += chunk
                except trio.BrokenResourceError:
                    pass
            n.cancel_scope.cancel()
        assert json.loads(got.splitlines()[0])["error"]["code"] == LINE_TOO_LONG
        await still_serves(sock)


@pytest.mark.trio
async def test_half_a_line_then_silence_is_dropped(tmp_path: Path, state: Path) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock, line_timeout=1.0):
        s = await trio.open_unix_socket(str(sock))
        async with s:
            await s.send_all(b'{"jsonrpc": "2.0", "id": 1, "meth')
            await still_serves(sock)
            with trio.fail_after(10):
                assert await s.receive_some(100) == b""  # closed by the daemon
        await still_serves(sock)


@pytest.mark.trio
async def test_a_client_that_never_reads_is_dropped(tmp_path: Path, state: Path) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock, send_timeout=2.0) as d:
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(sock))
        raw.setblocking(False)
        request = b'{"jsonrpc": "2.0", "id": 1, "method": "daemon.status"}\n'
        sent = 0
        with trio.fail_after(30):
            while d.connections == 0:
                await trio.sleep(0.01)
            while d.connections > 0:
                try:
                    sent += raw.send(request * 100)
                except BlockingIOError:
                    pass
                except OSError:
                    break  # dropped
                await trio.sleep(0.01)
        raw.close()
        assert sent > 0
        await still_serves(sock)


@pytest.mark.trio
async def test_a_thousand_idle_connections(tmp_path: Path, state: Path) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock) as d:
        idle = []
        try:
            for _ in range(1000):  # each connect in a thread: the daemon must accept it
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                idle.append(s)
                await trio.to_thread.run_sync(s.connect, str(sock))
            with trio.fail_after(30):
                while d.connections < 1000:
                    await trio.sleep(0.05)
            t = time.monotonic()
            await still_serves(sock)
            assert time.monotonic() - t < 5
        finally:
            for s in idle:
                s.close()
        with trio.fail_after(30):
            while d.connections > 0:
                await trio.sleep(0.05)


@pytest.mark.trio
async def test_optimize_as_a_job_keeps_the_image_until_it_is_whole(tmp_path: Path,
                                                                   state: Path) -> None:
    image = tmp_path / "o.imagefs"
    run_imagefs("capture", big_tree(tmp_path / "tree"), image, "--name", "big", "--level", "1")
    run_imagefs("capture", tmp_path / "tree", image, "--name", "again")
    run_imagefs("delete", image, "big")
    before = image.read_bytes()
    async with daemon_in_process(tmp_path / "d.sock"), client(tmp_path / "d.sock") as c:
        space = await c.call("images.info", image=str(image), space=True)
        # "again" holds the same content as the deleted "big": only records are left over
        assert space["reclaimable_chunks"] == 0 and space["indices"][0]["stored_bytes"] > 0
        job = await c.call("images.optimize", image=str(image), subscribe=True)
        await c.next_notification()
        await c.call("jobs.cancel", job=job["job"])
        done = await c.call("jobs.wait", job=job["job"], timeout=60)
        assert done["state"] in ("cancelled", "done"), done
        if done["state"] == "cancelled":
            assert image.read_bytes() == before
        job = await c.call("images.optimize", image=str(image))
        done = await c.call("jobs.wait", job=job["job"], timeout=60)
        assert done["state"] == "done", done
        assert done["result"]["image"] == str(image) and done["result"]["indices"] == 1
        space = await c.call("images.info", image=str(image), space=True)
        assert space["reclaimable_bytes"] == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".imagefs-optimize-")]
    run_imagefs("verify", image)
    history = json.loads(run_imagefs("info", image, "1", "--history", "--json").stdout)
    last = history["indices"][0]["history"][-1]
    assert last["action"] == "optimize" and last["method"] == "images.optimize"
