"""jobs.* and daemon.status.  A job is visible to the uid that started it, and to root."""

from __future__ import annotations

import os
import time
from typing import Any

import trio

import imagefs
from imagefs.places import state_dir

from .jobs import Job
from .protocol import NO_SUCH_JOB, NOT_CANCELLABLE, RpcError
from .rpc import METHODS, Call, method, optional, required


def own_job(call: Call, job_id: str) -> Job:
    job = call.daemon.jobs.get(job_id)
    if job is None or (job.owner != call.peer.uid and not call.peer.is_root):
        raise RpcError(NO_SUCH_JOB, f"no job {job_id!r} (of yours)")
    return job


@method("jobs.list", all=optional(bool, default=False))
async def list_jobs(call: Call, all: bool) -> Any:  # noqa: A002 - the parameter's name
    """The caller's jobs (root: with `all`, everyone's), oldest first, finished ones
    included (the last 1000)."""
    return [j.to_json() for j in call.daemon.jobs.jobs.values()
            if j.owner == call.peer.uid or (all and call.peer.is_root)]


@method("jobs.get", job=required(str))
async def get_job(call: Call, job: str) -> Any:
    """One job: state, progress, result or error."""
    return own_job(call, job).to_json()


@method("jobs.cancel", job=required(str))
async def cancel_job(call: Call, job: str) -> Any:
    """Ask a job to stop; it ends `cancelled` having changed nothing.  Refused once the job
    publishes (or is over)."""
    j = own_job(call, job)
    if not call.daemon.jobs.cancel(j):
        raise RpcError(NOT_CANCELLABLE, f"job {job} is {j.state}"
                       + ("" if j.state in ("done", "failed", "cancelled")
                          else " and past the point where it can be undone"))
    return j.to_json()


MAX_WAIT = 366 * 86400  # the longest `timeout` of jobs.wait, in seconds (leave it out: forever)


@method("jobs.wait", job=required(str),
        timeout=optional(int, float, default=None, minimum=0, maximum=MAX_WAIT))
async def wait_job(call: Call, job: str, timeout: float | None) -> Any:
    """Wait until the job is over (or `timeout` seconds pass); the job as it is then."""
    j = own_job(call, job)
    with trio.move_on_after(timeout if timeout is not None else float("inf")):
        await j.finished.wait()
    return j.to_json()


@method("jobs.subscribe", job=required(str))
async def subscribe_job(call: Call, job: str) -> Any:
    """Send this connection the job's `job.progress` and `job.done` notifications from now
    on (a job already over sends `job.done` at once)."""
    j = own_job(call, job)
    if j.finished.is_set():
        call.connection.notify("job.done", j.to_json())
    elif call.connection.notify not in j.subscribers:
        j.subscribers.append(call.connection.notify)
    return j.to_json()


@method("daemon.status")
async def status(call: Call) -> Any:
    """The daemon: version, pid, uptime, connections, jobs, the caller's credentials and
    every method it serves."""
    d = call.daemon
    jobs = d.jobs.jobs.values()
    return {
        "version": imagefs.__version__, "pid": os.getpid(),
        "uptime": round(time.time() - d.started, 3),
        "socket": d.config.socket_path, "group": d.config.group,
        "state_dir": state_dir(), "stopping": d.stopping,
        "connections": d.connections,
        "jobs": {s: sum(1 for j in jobs if j.state == s) for s in ("queued", "running")},
        "peer": {"pid": call.peer.pid, "uid": call.peer.uid, "gid": call.peer.gid},
        "methods": sorted(METHODS),
    }
