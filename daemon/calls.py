"""What the method modules (api_*.py) share: running work in a worker thread of the caller's
quota (as the caller, where it touches files), what an index's history records of a call,
and the answer of a method that started a job."""

from __future__ import annotations

from typing import Any

from .access import acting_as
from .jobs import Job
from .limits import run_in_thread
from .peers import Peer
from .rpc import Call


def history_who(call: Call, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What an index's history records of a change made through the daemon."""
    return {**call.peer.who(), "via": "daemon", "method": name, "params": params}


def job_answer(call: Call, job: Job, subscribe: bool) -> dict[str, Any]:
    """The answer of a method that started a job: the job, followed by this connection
    if it asked to be."""
    if subscribe:
        job.subscribers.append(call.connection.notify)
    return job.to_json()


async def in_thread(fn: Any, *args: Any, abandon: bool = True, **kwargs: Any) -> Any:
    """fn in a worker thread of the calling client's quota (daemon.limits.run_in_thread)."""
    return await run_in_thread(lambda: fn(*args, **kwargs), abandon=abandon)


async def in_thread_as(peer: Peer, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn in a worker thread (of the client's quota) that opens and creates files as
    peer."""

    def run() -> Any:
        with acting_as(peer):
            return fn(*args, **kwargs)

    return await run_in_thread(run)
