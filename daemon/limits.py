"""How many of the daemon's threads one client may hold, so that no client stalls the others.

Everything that touches a file runs in a worker thread (the trio loop never blocks), and
a thread can be held for long by what a client names: an image on a filesystem that stops
answering, an image whose writer lock another process holds, or simply many big requests.
So each client has a quota of threads of its own and waits in its own queue when it has
used them up; the others go on being served by the shared pool meanwhile.

- A *client* is a uid: the connections of one user share one quota (opening more
  connections buys nothing).  Root's connections are each a client of their own: root's
  programs (a deployment tool, a web UI, cron) are independent, and root can stop the
  daemon anyway.
- Quick requests (images.info, images.diff, images.delete, path checks, mounts, sessions)
  take a thread of the client's quota (CLIENT_THREADS) and of the shared pool
  (SHARED_THREADS); excess requests wait, in order, for the client's next free thread.
- Jobs take a thread of their owner's job quota (`--threads` minus one, at least one) and
  of the jobs' pool (`--threads`); excess jobs stay `queued`.

A thread stays counted against its client until it really ends, also when its request was
given up (its connection dropped, the daemon stopping): a client cannot free its quota by
reconnecting while its threads are still stuck.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import trio

if TYPE_CHECKING:
    from .peers import Peer

T = TypeVar("T")

CLIENT_THREADS = 4    # quick requests of one client that run at once
SHARED_THREADS = 32   # quick requests of all clients that run at once


class Quota:
    """A limiter for trio.to_thread.run_sync: a slot of the client's own, then one of the
    shared pool; both are released when the thread ends (even an abandoned one)."""

    def __init__(self, own: trio.CapacityLimiter, shared: trio.CapacityLimiter) -> None:
        self.own = own
        self.shared = shared

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.own.acquire_on_behalf_of(borrower)
        try:
            await self.shared.acquire_on_behalf_of(borrower)
        except BaseException:
            self.own.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self.shared.release_on_behalf_of(borrower)
        self.own.release_on_behalf_of(borrower)


class Quotas:
    """The quotas of the daemon's clients for quick requests."""

    def __init__(self, per_client: int = CLIENT_THREADS,
                 shared: int = SHARED_THREADS) -> None:
        self.per_client = per_client
        self.shared = trio.CapacityLimiter(shared)
        self._by_uid: dict[int, trio.CapacityLimiter] = {}

    def for_peer(self, peer: Peer) -> Quota:
        """The quota of a new connection of peer's: its uid's (root: its own)."""
        if peer.is_root:
            return Quota(trio.CapacityLimiter(self.per_client), self.shared)
        return self.for_uid(peer.uid)

    def for_uid(self, uid: int) -> Quota:
        """The quota all of uid's work shares."""
        own = self._by_uid.get(uid)
        if own is None:
            own = self._by_uid[uid] = trio.CapacityLimiter(self.per_client)
        return Quota(own, self.shared)


# The quota of the client whose request the current task serves (set by the connection
# for each request; a task the daemon runs for itself has none and uses trio's default).
current_quota: contextvars.ContextVar[Quota | None] = contextvars.ContextVar(
    "imagefs_daemon_quota", default=None)


async def run_in_thread(fn: Callable[..., T], *args: Any, abandon: bool = True) -> T:
    """fn(*args) in a worker thread counted against the current client's quota.  With
    abandon, given up (not waited for) when the request is cancelled: a thread stuck in a
    filesystem that does not answer must not keep the daemon from dropping a client or
    from stopping.  Work whose end the daemon must see (a mount it has to remember to stop)
    passes abandon=False, and must itself end in bounded time."""
    quota = current_quota.get()
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandon,
                                         limiter=as_limiter(quota))  # None: trio's default


def as_limiter(quota: Quota | None) -> trio.CapacityLimiter | None:
    """A Quota as trio's limiter argument: trio takes any object with
    acquire_on_behalf_of and release_on_behalf_of; its annotation names CapacityLimiter."""
    return cast("trio.CapacityLimiter | None", quota)
