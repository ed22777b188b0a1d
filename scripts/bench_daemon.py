"""Daemon benchmarks for scripts/bench: request latency under load, and job throughput.

`imagefs daemon` runs as a child with its socket, state and mount records under the work
dir.  On a copy of the bookworm-minbase image:
  * latency of `images.info` (p50, p99, in ms) with 1, 10 and 50 concurrent clients (trio,
    one connection each, 2000 requests in all per level) while commit jobs run: a thread
    keeps writing 200 small files into a session on index 1 and committing them through
    the daemon the whole time;
  * job throughput: 100 `sessions.commit` jobs submitted at once (each publishing a new
    index, so each is a real commit of the session's one changed file), timed from the
    first submission until the last is done -> commits/s.
No peer has a daemon to compare with: the rows have no targets (the issue asks for the
figures).  Everything is undone in a finally block (the session discarded, the daemon
stopped by its pid, any mount left under the work dir detached).

Run inside scripts/bench (--no-daemon skips these rows) or alone:
  .venv/bin/python scripts/bench_daemon.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.client import AsyncClient, Client  # noqa: E402

LEVELS = (1, 10, 50)
REQUESTS = 2000
QUEUED = 100


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def latencies(sock: str, image: str, clients: int) -> list[float]:
    out: list[float] = []
    per = REQUESTS // clients

    async def one() -> None:
        c = await AsyncClient.connect(sock)
        async with c:
            for _ in range(per):
                t = time.perf_counter()
                await c.call("images.info", image=image)
                out.append((time.perf_counter() - t) * 1000)

    async with trio.open_nursery() as n:
        for _ in range(clients):
            n.start_soon(one)
    return out


def committer(sock: str, session: str, mnt: Path, stop: threading.Event,
              done: list[int]) -> None:
    """Keep a commit job running: write files, commit, wait; until stop."""
    with Client(sock) as c:
        k = 0
        while not stop.is_set():
            for _ in range(200):
                (mnt / f"load{k}").write_bytes(b"%099d\n" % k)
                k += 1
            job = c.call("sessions.commit", session=session)
            c.wait_job(job["job"])
            done[0] += 1


@contextlib.contextmanager
def daemon_child(imagefs: str, work: Path, env: dict[str, str]) -> Iterator[Path]:
    """`imagefs daemon` as a child of the bench, listening on work/daemon.sock once this
    yields; stopped by its pid (SIGTERM) at the end.  Sessions it mounted are stopped with
    it; read-only mounts it made are not (they are their own processes)."""
    sock = work / "daemon.sock"
    with open(work / "daemon.log", "ab") as log:
        proc = subprocess.Popen([imagefs, "daemon", "--socket", str(sock)], env=env,
                                stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with Client(str(sock), timeout=2) as c:
                    c.call("daemon.status")
                break
            except OSError:
                time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_daemon(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                   timed: Callable[..., None]) -> None:
    name, short, src = next((t for t in trees if t[0] == "bookworm-minbase"), trees[0])
    work = b.work
    image = work / f"{short}.imagefs"
    if not image.exists():
        b.run([imagefs, "capture", str(src), str(image), "--name", name])
    copy = work / "daemon.imagefs"
    shutil.copyfile(image, copy)
    state, mnt = work / "daemon-state", work / "daemon-mnt"
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "IMAGEFS_STATE_DIR": str(state), "IMAGEFS_RUN_DIR": str(work / "drun")}
    session = None
    try:
        with daemon_child(imagefs, work, env) as sock, Client(str(sock)) as c:
            session = c.call("sessions.open", image=str(copy), index=1,
                             mountpoint=str(mnt))["session"]
            latency_rows(b, timed, sock, copy, mnt, session)
            queued_commit_row(b, timed, c, mnt, session)
            c.call("sessions.discard", session=session)
            session = None
    finally:
        if session is not None:
            subprocess.run([imagefs, "unmount", str(mnt), "--discard", "--no-daemon"],
                           env=env, capture_output=True)
        with open("/proc/self/mountinfo") as fh:
            left = [line.split()[4] for line in fh if str(mnt) in line.split()[4]]
        for m in left:
            subprocess.run(["umount", "-l", m], capture_output=True)
        copy.unlink(missing_ok=True)
        for d in (state, mnt, work / "drun"):
            shutil.rmtree(d, ignore_errors=True)


def latency_rows(b: Any, timed: Callable[..., None], sock: Path, copy: Path, mnt: Path,
                 session: str) -> None:
    """images.info latency at each client count while a thread keeps commits running."""
    stop, commits = threading.Event(), [0]
    t = threading.Thread(target=committer, args=(str(sock), session, mnt, stop,
                                                 commits))
    t.start()
    try:
        for n in LEVELS:
            lat = trio.run(latencies, str(sock), str(copy), n)
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                row = b.row(f"daemon_info_{label}_{n}",
                            f"daemon images.info latency {label}, {n} client(s), "
                            "commits running (ms)", "ms")
                timed(row, "imagefs", percentile(lat, q))
            print(f"  images.info x{len(lat)}, {n} clients: p50 "
                  f"{statistics.median(lat):.2f} ms, p99 {percentile(lat, 0.99):.2f} "
                  f"ms", file=sys.stderr)
    finally:
        stop.set()
        t.join()
    print(f"  {commits[0]} commit jobs ran during the latency runs", file=sys.stderr)


def queued_commit_row(b: Any, timed: Callable[..., None], c: Client, mnt: Path,
                      session: str) -> None:
    """QUEUED sessions.commit jobs submitted at once: how many complete per second."""
    (mnt / "queued").write_text("one change\n")
    start = time.perf_counter()
    jobs = [c.call("sessions.commit", session=session, new_index=f"q{i}")["job"]
            for i in range(QUEUED)]
    for j in jobs:
        end = c.call("jobs.wait", job=j)
        if end["state"] != "done":
            raise RuntimeError(f"queued commit {j} ended {end['state']}: "
                               f"{end['error']}")
    seconds = time.perf_counter() - start
    row = b.row("daemon_queued_commits", f"{QUEUED} queued sessions.commit jobs "
                "(commits/s)", "/s", higher_is_better=True)
    timed(row, "imagefs", QUEUED / seconds)
    print(f"  {QUEUED} queued commits: {seconds:.2f} s", file=sys.stderr)


def main() -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import Bench, fixture_tree, table, timed

    work = Path(os.environ.get("TMPDIR") or "/tmp") / "imagefs-bench-daemon"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        b = Bench(work, {}, None)
        tree = ("bookworm-minbase", "minbase", fixture_tree("bookworm-minbase"))
        measure_daemon(b, [tree], str(REPO / ".venv" / "bin" / "imagefs"), timed)
        print(table(b.rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
