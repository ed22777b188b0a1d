"""Hostile clients of the daemon (issue 12, findings 3 and 6): a client that names a FIFO,
a user who ties up worker threads with requests that cannot finish, a verify stuck on a
filesystem that stopped answering when SIGTERM comes, and request lines that used to reach
the daemon's internal error (-32603): nesting too deep to parse, NaN and 401-digit
numbers, NUL and `..` in path parameters.  One admitted client must never stall the
others, and every bad input gets its proper JSON-RPC error.

The stalling tests run `imagefs daemon` as a child process (a daemon stuck by a test on
broken code is killed, not left in pytest); the hostile clients are forked children that
take another uid (daemon_helpers.as_user) and talk raw JSON lines."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import mounted, run_imagefs
from daemon_helpers import (
    TEST_GID,
    as_user,
    call_as,
    client,
    daemon_in_process,
    daemon_process,
    public_dir,
    raw_exchange,
)

from daemon.client import Client
from daemon.protocol import INVALID_PARAMS, PARSE_ERROR, RpcError

HOSTILE = 47301  # members of the daemon's group (TEST_GID), without a passwd entry
VICTIM = 47302
NOT_AN_IMAGE = -32004      # NotAnImage, exit code 4
DESTINATION_ERROR = -32007  # DestinationError, exit code 7


@pytest.fixture
def pub() -> Iterator[Path]:
    """A directory every uid may enter, removed at the end."""
    d = public_dir("imagefs-hostile-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_image(path: Path, tree: Path | None = None, owner: int | None = None) -> Path:
    """A small image of two indices (base, second): 1 MiB of random bytes and a hostname."""
    if tree is None:
        tree = path.parent / f"{path.name}.tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "hostname").write_text("golden\n")
        (tree / "data").write_bytes(os.urandom(1 << 20))
    run_imagefs("capture", tree, path, "--name", "base")
    run_imagefs("capture", tree, path, "--name", "second")
    if owner is not None:
        os.chown(path, owner, TEST_GID)
    return path


def own_dir(path: Path, owner: int) -> Path:
    path.mkdir()
    os.chown(path, owner, TEST_GID)
    path.chmod(0o755)
    return path


def request(rid: int | str, method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                       "params": params}).encode() + b"\n"


def fire(sock: Path, batches: list[list[bytes]], answers: bool = True,
         linger: float = 0.0, timeout: float = 20.0) -> dict[str, Any]:
    """One connection per batch, every line of it sent at once; then (answers) read until
    every request has its answer, or (not answers) keep the connections open for linger
    seconds.  {id: answer}, JSON-able (it comes back from a forked child)."""
    conns = []
    for batch in batches:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(b"".join(batch))
        conns.append((s, len(batch)))
    got: dict[str, Any] = {}
    try:
        if not answers:
            time.sleep(linger)
            return got
        deadline = time.monotonic() + timeout
        for s, expected in conns:
            buf = b""
            seen = 0
            while seen < expected:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    doc = json.loads(line)
                    if "id" in doc:
                        got[str(doc["id"])] = doc
                        seen += 1
        return got
    finally:
        for s, _ in conns:
            s.close()


def fire_as(uid: int, sock: Path, batches: list[list[bytes]], **kw: Any) -> dict[str, Any]:
    out = as_user(uid, [TEST_GID], lambda: fire(sock, batches, **kw))
    assert "result" in out, out
    return out["result"]


def in_background(fn: Any) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    return t, box


def timed_call(sock: Path, method: str, **params: Any) -> tuple[float, Any]:
    """(seconds, result) of one call as root on a fresh connection."""
    start = time.monotonic()
    with Client(str(sock), timeout=30) as c:
        result = c.call(method, **params)
    return time.monotonic() - start, result


def wait_job(sock: Path, job: str, timeout: float) -> dict[str, Any]:
    with Client(str(sock), timeout=timeout + 10) as c:
        return c.call("jobs.wait", job=job, timeout=timeout)


@contextlib.contextmanager
def locked(*paths: Path) -> Iterator[None]:
    """Hold each file's writer lock (flock, as an imagefs writer does) from this process."""
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)


# --- finding 3: a FIFO named as an image ------------------------------------------------------

def test_fifo_images_are_refused_at_once_and_stall_nobody(pub: Path) -> None:
    """A member names a FIFO it owns as the image of every method, many times over several
    connections: each call is refused at once (no job is started for it), and meanwhile
    another client's images.info is answered promptly and its verify completes."""
    mine = own_dir(pub / "hostile", HOSTILE)
    pipe = mine / "pipe.imagefs"
    os.mkfifo(pipe)
    os.chown(pipe, HOSTILE, TEST_GID)
    pipe.chmod(0o666)
    good = make_image(pub / "good.imagefs")
    other = make_image(pub / "other.imagefs")
    src = pub / "good.imagefs.tree"
    calls = [("images.verify", {"image": str(pipe)}),
             ("images.info", {"image": str(pipe)}),
             ("images.diff", {"image": str(pipe), "index": 1, "other": 2}),
             ("images.delete", {"image": str(pipe), "index": 1}),
             ("images.capture", {"image": str(pipe), "source": str(src), "name": "x"}),
             ("images.export", {"image": str(good), "index": 1, "dest": str(pipe)})]
    batches = [[request(f"{c}.{i}.{k}", m, **p) for i, (m, p) in enumerate(calls)
                for k in range(3)] for c in range(3)]
    with daemon_process(pub, "--group", str(TEST_GID)) as d:
        hostile, box = in_background(lambda: fire_as(HOSTILE, d.sock, batches))
        time.sleep(0.3)  # the FIFO requests are in
        took, info = timed_call(d.sock, "images.info", image=str(other))
        assert took < 2.0 and [i["name"] for i in info["indices"]] == ["base", "second"]
        took, job = timed_call(d.sock, "images.verify", image=str(good))
        done = wait_job(d.sock, job["job"], 10)
        assert done["state"] == "done" and done["result"]["ok"] is True, done
        hostile.join(30)
        answers = box[0]
        assert len(answers) == 3 * 3 * len(calls), answers
        for rid, answer in answers.items():
            method = calls[int(rid.split(".")[1])][0]
            err = answer.get("error")
            assert err is not None, (method, answer)  # refused, not a job
            if method == "images.export":
                assert err["code"] == DESTINATION_ERROR, answer
                assert err["message"] == (f"{pipe}: exists and is not an imagefs image "
                                          "(a FIFO, not a regular file)"), answer
            else:
                assert err["code"] == NOT_AN_IMAGE, answer
                assert err["message"] == (f"{pipe}: not an imagefs image (a FIFO, not a "
                                          "regular file)"), answer
                assert err["data"] == {"type": "NotAnImage", "exit_code": 4}, answer
        with Client(str(d.sock), timeout=30) as c:
            jobs = c.call("jobs.list", all=True)
            assert [j["owner"] for j in jobs] == [0], jobs  # the victim's verify alone
            assert c.call("daemon.status")["pid"] == d.pid


# --- per-client limits ------------------------------------------------------------------------

def test_one_user_cannot_take_every_request_thread(pub: Path) -> None:
    """A member sends 48 images.delete of an image whose writer lock another process holds
    (each waits up to 30 s for it) over three connections: only its own requests wait (a
    quota of threads per user, not per connection); root's and another member's
    images.info are answered at once."""
    mine = own_dir(pub / "hostile", HOSTILE)
    target = make_image(mine / "locked.imagefs", owner=HOSTILE)
    goods = [make_image(pub / f"good{i}.imagefs") for i in range(2)]
    batches = [[request(f"{c}.{k}", "images.delete", image=str(target), index="base")
                for k in range(16)] for c in range(3)]
    with daemon_process(pub, "--group", str(TEST_GID)) as d, locked(target):
        hostile, _ = in_background(
            lambda: fire_as(HOSTILE, d.sock, batches, answers=False, linger=6))
        time.sleep(1.0)  # 48 deletes wait for the lock
        took, info = timed_call(d.sock, "images.info", image=str(goods[0]))
        assert took < 2.0, took
        assert [i["name"] for i in info["indices"]] == ["base", "second"]
        start = time.monotonic()
        r = call_as(d.sock, VICTIM, [TEST_GID], "images.info", image=str(goods[1]))
        assert time.monotonic() - start < 2.0 and "result" in r, r
        # The hostile user's own next request waits behind its deletes.
        r = as_user(HOSTILE, [TEST_GID], lambda: fire(
            d.sock, [[request(1, "daemon.status"), request(2, "images.info",
                                                         image=str(goods[1]))]],
            timeout=1.5))
        answers = r["result"]
        assert "result" in answers["1"] and "2" not in answers, answers
        hostile.join(30)


def test_one_user_cannot_take_every_job_thread(pub: Path) -> None:
    """A member starts four captures into images whose writer locks another process holds:
    three of them run (waiting for their locks; --threads 4 leaves one thread for the
    others), the fourth stays queued, and root's verify runs and completes meanwhile.  A
    capture waiting for a lock can be cancelled."""
    mine = own_dir(pub / "hostile", HOSTILE)
    src = pub / "tree"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    targets = [make_image(mine / f"t{i}.imagefs", owner=HOSTILE) for i in range(4)]
    good = make_image(pub / "good.imagefs")
    with daemon_process(pub, "--group", str(TEST_GID)) as d, locked(*targets):
        started = []
        for t in targets:
            r = call_as(d.sock, HOSTILE, [TEST_GID], "images.capture", image=str(t),
                        source=str(src), name="new")
            assert "result" in r, r
            started.append(r["result"]["job"])
        with Client(str(d.sock), timeout=60) as c:
            deadline = time.monotonic() + 10
            while True:
                states = [c.call("jobs.get", job=j)["state"] for j in started]
                if sorted(states) == ["queued", "running", "running", "running"] or \
                        time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert sorted(states) == ["queued", "running", "running", "running"], states
            job = c.call("images.verify", image=str(good))
            done = c.call("jobs.wait", job=job["job"], timeout=10)
            assert done["state"] == "done" and done["result"]["ok"] is True, done
            # Cancelled while they wait for their locks, they end at once, changing nothing.
            for j in started:
                c.call("jobs.cancel", job=j)
            for j in started:
                end = c.call("jobs.wait", job=j, timeout=5)
                assert end["state"] == "cancelled", end
    for t in targets:
        info = json.loads(run_imagefs("info", t, "--json").stdout)
        assert [i["name"] for i in info["indices"]] == ["base", "second"]


# --- shutdown ---------------------------------------------------------------------------------

def test_sigterm_ends_a_stuck_verify_within_seconds(pub: Path) -> None:
    """A verify whose image lies on a filesystem that stopped answering (the FUSE mount's
    process is stopped: its open never returns, and no progress report comes to cancel it)
    does not keep SIGTERM from ending the daemon: it is abandoned after the grace period."""
    inner = pub / "tree"
    inner.mkdir()
    make_image(inner / "inner.imagefs", owner=None)
    shutil.rmtree(inner / "inner.imagefs.tree")
    outer = pub / "outer.imagefs"
    run_imagefs("capture", inner, outer, "--name", "images")
    mnt = pub / "mnt"
    with mounted(outer, "images", mnt) as rec:
        image = mnt / "inner.imagefs"
        # In the kernel's cache now: the daemon's checks (stat, realpath) need no answer.
        os.stat(mnt)
        assert os.path.realpath(image) == str(image) and os.path.getsize(image) > 0
        try:
            with daemon_process(pub) as d:
                os.kill(rec["pid"], signal.SIGSTOP)  # the mount process we started
                with Client(str(d.sock), timeout=30) as c:
                    job = c.call("images.verify", image=str(image), subscribe=True)
                    while c.next_notification()[1]["state"] != "running":
                        pass
                time.sleep(0.5)  # in its open(), which the stopped mount never answers
                start = time.monotonic()
                try:
                    rc = d.kill(signal.SIGTERM, timeout=15)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the daemon did not stop within 15 s (job {job['job']})")
                took = time.monotonic() - start
                assert rc == 0 and took < 8.0, (rc, took, d.log.read_text())
                assert "abandoned" in d.log.read_text()
                assert not d.sock.exists()
        finally:
            os.kill(rec["pid"], signal.SIGCONT)


# --- finding 6: inputs that reached -32603 ----------------------------------------------------

@pytest.mark.trio
@pytest.mark.parametrize("line", [
    b"[" * 100_000,
    b"{\"a\":" * 100_000,
    b'{"jsonrpc": "2.0", "id": 7, "method": "daemon.status", "params": {"x": '
    + b"[" * 50_000 + b"]" * 50_000 + b"}}",
], ids=["arrays", "objects", "in-params"])
async def test_a_line_nested_too_deeply_is_a_parse_error(tmp_path: Path, line: bytes) -> None:
    sock = tmp_path / "d.sock"
    async with daemon_in_process(sock):
        good = request("after", "daemon.status")
        err, ok = await raw_exchange(sock, line + b"\n" + good, replies=2)
        assert err["id"] is None and err["error"]["code"] == PARSE_ERROR, err
        assert "nested too deeply" in err["error"]["message"], err
        assert ok["id"] == "after" and "result" in ok, ok
        async with client(sock) as c:
            assert (await c.call("daemon.status"))["pid"] == os.getpid()


@pytest.mark.trio
async def test_numbers_out_of_range_are_invalid_params(tmp_path: Path) -> None:
    """NaN, the infinities, a 401-digit integer, a negative or too long timeout and a
    boolean where a number belongs: -32602 naming the parameter, for every numeric
    parameter (jobs.wait's timeout, the levels, index numbers)."""
    sock = tmp_path / "d.sock"
    image = make_image(tmp_path / "n.imagefs")
    huge = "1" + "0" * 400
    async with daemon_in_process(sock), client(sock) as c:
        job = (await c.call("images.verify", image=str(image)))["job"]
        assert (await c.call("jobs.wait", job=job, timeout=30))["state"] == "done"
        assert (await c.call("jobs.wait", job=job, timeout=0))["state"] == "done"
        cases = [
            ("jobs.wait", "timeout", "NaN", "must be a finite number, not NaN"),
            ("jobs.wait", "timeout", "Infinity", "must be a finite number, not Infinity"),
            ("jobs.wait", "timeout", "-Infinity", "not -Infinity"),
            ("jobs.wait", "timeout", "1e400", "not Infinity"),
            ("jobs.wait", "timeout", huge, "from 0 to 31622400, not a 401-digit integer"),
            ("jobs.wait", "timeout", "-1", "from 0 to 31622400, not -1"),
            ("jobs.wait", "timeout", "31622401", "from 0 to 31622400, not 31622401"),
            ("jobs.wait", "timeout", "true", "must be a number, not a boolean"),
            ("images.capture", "level", huge, "not a 401-digit integer"),
            ("images.capture", "level", "NaN", "must be an integer, not a number"),
            ("images.export", "level", "-" + huge, "not a 401-digit integer"),
            ("images.export", "level", "true", "must be an integer, not a boolean"),
            ("images.info", "index", huge, "not a 401-digit integer"),
            ("images.diff", "other", huge, "not a 401-digit integer"),
            ("images.delete", "index", "Infinity", "must be an integer or a string"),
        ]
        params = {"jobs.wait": {"job": job},
                  "images.capture": {"image": str(image), "source": str(tmp_path),
                                     "name": "n"},
                  "images.export": {"image": str(image), "index": 1,
                                    "dest": str(tmp_path / "out.imagefs")},
                  "images.info": {"image": str(image)},
                  "images.diff": {"image": str(image), "index": 1},
                  "images.delete": {"image": str(image)}}
        lines = b""
        for i, (method, name, value, _) in enumerate(cases):
            doc = json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                              "params": {**params[method], name: "@"}})
            lines += doc.replace('"@"', value).encode() + b"\n"
        answers = {a["id"]: a for a in await raw_exchange(sock, lines, replies=len(cases))}
        for i, (method, name, _, words) in enumerate(cases):
            err = answers[i].get("error")
            assert err and err["code"] == INVALID_PARAMS, (cases[i], answers[i])
            assert err["message"].startswith(f"{method}: `{name}` must be "), err
            assert words in err["message"], (cases[i], err)
        assert (await c.call("daemon.status"))["pid"] == os.getpid()
        assert not (tmp_path / "out.imagefs").exists()
        assert [j["job"] for j in await c.call("jobs.list")] == [job]


@pytest.mark.trio
async def test_nul_relative_and_dotdot_in_paths_are_invalid_params(tmp_path: Path) -> None:
    """Every path parameter of every method: NUL, a relative path, a `..` component are
    -32602 with a message naming the parameter, before anything is looked at."""
    sock = tmp_path / "d.sock"
    image = make_image(tmp_path / "p.imagefs")
    ok = str(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cases = [
        ("images.info", {"image": "/tmp/a\0b.imagefs"}, "image", "cannot contain NUL"),
        ("images.verify", {"image": "/srv/../etc/shadow"}, "image", "'..' is not allowed"),
        ("images.capture", {"image": ok, "source": f"{tmp_path}/../etc", "name": "x"},
         "source", "'..' is not allowed"),
        ("images.capture", {"image": ok, "source": "etc\0", "name": "x"}, "source",
         "cannot contain NUL"),
        ("images.export", {"image": ok, "index": 1, "dest": f"{tmp_path}/a/../b.imagefs"},
         "dest", "'..' is not allowed"),
        ("images.export", {"image": ok, "index": 1, "dest": "out.imagefs"}, "dest",
         "is relative"),
        ("images.delete", {"image": f"{ok}\0", "index": 1}, "image", "cannot contain NUL"),
        ("mounts.open", {"image": ok, "index": 1, "mountpoint": f"{mnt}/../mnt"},
         "mountpoint", "'..' is not allowed"),
        ("mounts.open", {"image": ok, "index": 1, "mountpoint": str(mnt),
                         "run_dir": "/run/\0x"}, "run_dir", "cannot contain NUL"),
        ("mounts.open", {"image": f"{tmp_path}/../p.imagefs", "index": 1,
                         "mountpoint": str(mnt)}, "image", "'..' is not allowed"),
        ("sessions.open", {"image": ok, "index": 1, "mountpoint": f"{mnt}/.."},
         "mountpoint", "'..' is not allowed"),
        ("sessions.commit", {"session": f"{mnt}/../mnt"}, "session", "'..' is not allowed"),
        ("sessions.discard", {"session": "ab\0cd"}, "session", "is not a session id"),
        ("sessions.discard", {"session": "mnt/web"}, "session", "is relative"),
        ("sessions.remount", {"session": "..", "mountpoint": str(mnt)}, "session",
         "is not a session id"),
        ("sessions.remount", {"session": "abcd1234", "mountpoint": f"{mnt}/../x"},
         "mountpoint", "'..' is not allowed"),
    ]
    async with daemon_in_process(sock), client(sock) as c:
        for method, params, name, words in cases:
            with pytest.raises(RpcError) as e:
                await c.call(method, **params)
            assert e.value.code == INVALID_PARAMS, (method, params, e.value.message)
            assert e.value.message.startswith(f"`{name}`"), (method, e.value.message)
            assert words in e.value.message, (method, e.value.message)
        assert (await c.call("daemon.status"))["pid"] == os.getpid()
        assert await c.call("jobs.list") == []
