"""What the servicing methods (packages.*, health.*, firstboot.*) share: where they work (an
image and its index, or a session of the caller's), the job that runs the servicing
transaction, and who may ask.

The transaction (servicing.transaction) runs in a job thread.  Its writable mounts are
started by the daemon's fork server, as sessions of the caller's tied to the daemon's
process, never forked from the daemon's threads.  A cancel lands at the next step the work
reports, or at the latest just before the commit (JobContext.publishing); after that the
commit runs to its end.

Methods that run the image's own programs (dpkg, maintainer scripts) run them as root in a
container: only root may ask for those, since a crafted image's programs would otherwise
run with more rights than its owner has.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from imagefs.errors import UsageError
from imagefs.places import state_dir

from .access import IMAGE, READ, WRITE, check_path, path_param
from .calls import history_who, job_answer
from .forkserver import MountRequest, PendingMount
from .jobs import JobContext
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, optional

# The parameters of every servicing method that changes an index (as the CLI's
# IMAGE INDEX | --mount, --dry-run, --new-index).
SERVICING = dict(image=optional(str), index=optional(int, str), session=optional(str),
                 dry_run=optional(bool, default=False), new_index=optional(str),
                 subscribe=optional(bool, default=False))


class JobSteps:
    """servicing.transaction.Progress for a job: each step is one unit of progress, and the
    point where a cancel lands."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        ctx.set_total(0, "steps")

    def step(self, text: str) -> None:
        self.ctx.advance(1)


def only_root(call: Call, method: str) -> None:
    if not call.peer.is_root:
        raise RpcError(INVALID_PARAMS, f"{method}: runs the image's own programs as root in "
                       "a container; only root may ask for it",
                       {"type": UsageError.__name__, "exit_code": UsageError.exit_code})


def publishing(ctx: JobContext) -> Callable[[], bool]:
    """The transaction's question before its commit: True to go on (no cancel may land
    from now on); a cancel that came first ends the job cancelled (JobCancelled), as a
    cancel at any earlier step does."""

    def ask() -> bool:
        if not ctx.publishing():
            ctx.check()
            return False
        return True

    return ask


async def where(call: Call, method: str, image: str | None, index: int | str | None,
                session: str | None, want: str = WRITE) -> tuple[str | None, str]:
    """(the image's real path, index spec) or, for a session, (None, its mountpoint): what
    a servicing method works on, checked as the caller."""
    from .api_sessions import own_session

    if (image is None) == (session is None) or (image is not None and index is None):
        raise RpcError(INVALID_PARAMS, f"{method}: give `image` and `index`, or `session` "
                       "(a writable mount of yours)")
    if image is not None:
        path_param("image", image)
        return await check_path("image", image, call.peer, want, IMAGE), str(index)
    assert session is not None
    info = await own_session(call, session)
    if not info.live():
        raise UsageError(f"session {info.id} is not mounted (stale): remount it first")
    return None, info.mountpoint


def fork_server_mounter(call: Call
                        ) -> Callable[[str, int, str, Sequence[str]], PendingMount]:
    """servicing.transaction.Mounter: the caller's new session, mounted by the fork
    server and tied to the daemon's process."""
    confined = [] if call.peer.is_root else ["nosuid,nodev"]

    def mount(image: str, number: int, mountpoint: str, reads: Sequence[str]
              ) -> PendingMount:
        return call.daemon.fork_server.begin(MountRequest(
            image=image, index=str(number), mountpoint=mountpoint, options=confined,
            writable=True, owner=call.peer.uid, state_dir=state_dir(),
            tied_to=os.getpid(), volatile=True, warm=list(reads)))

    return mount


async def submit_change(call: Call, method: str, image: str | None, index: int | str | None,
                        session: str | None, dry_run: bool, new_index: str | None,
                        params: dict[str, Any], make: Callable[[], Any],
                        subscribe: bool) -> Any:
    """Job: run the Change make() builds as `imagefs VERB` would (servicing.transaction);
    its result is the Outcome's JSON."""
    from servicing.transaction import service, service_mount

    call.daemon.check_accepting()
    path, spec = await where(call, method, image, index, session,
                             READ if dry_run else WRITE)
    shown = {"image": image, "index": index, "session": session, "dry_run": dry_run,
             "new_index": new_index, **params}
    who = history_who(call, method, shown)
    mounter = fork_server_mounter(call)

    def work(ctx: JobContext) -> dict[str, Any]:
        steps = JobSteps(ctx)
        change = make()
        if path is None:
            outcome = service_mount(spec, change, dry_run=dry_run, progress=steps)
        else:
            outcome = service(path, spec, change, new_index=new_index, dry_run=dry_run,
                              who=who, progress=steps, publishing=publishing(ctx),
                              mounter=mounter, wait=60.0)
        return outcome.to_json()

    job = call.daemon.jobs.submit(method, shown, call.peer.uid, work, lock_key=path or spec)
    return job_answer(call, job, subscribe)


async def checked_paths(call: Call, name: str, values: list[Any], kind: str | None = None
                        ) -> list[str]:
    """Each of a list parameter's paths, checked readable by the caller."""
    if not values or not all(isinstance(v, str) for v in values):
        raise RpcError(INVALID_PARAMS, f"`{name}` must be a non-empty array of paths")
    return [await check_path(name, v, call.peer, READ, kind) for v in values]
