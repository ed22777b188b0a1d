"""store.*: pushing indices to an S3 store and pulling them from it, as jobs.

The store is spoken to with the daemon's own S3 credentials and endpoint (its environment:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE, IMAGEFS_S3_ENDPOINT; a unit's
EnvironmentFile), never with secrets sent over the socket: the daemon is the site's one
account on the store, and its clients are the users it already serves.  Local paths are
checked as the caller and the files read and written with the caller's identity, as for
images.export.  A cancelled push leaves objects no ref reaches (gc removes them); a
cancelled pull leaves LOCAL as it was.
"""

from __future__ import annotations

from typing import Any

from .access import CREATE, DEST, IMAGE, READ, acting_as, check_path, path_param
from .calls import history_who, job_answer
from .jobs import JobContext
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required


def _store_param(store: object) -> str:
    from imagefs.store.client import parse_url

    if not isinstance(store, str):
        raise RpcError(INVALID_PARAMS, "`store` must be a string: s3://BUCKET/PREFIX")
    parse_url(store)  # a UsageError (one line) for anything else
    return store


def _selection(index: object) -> str:
    if isinstance(index, list):
        if not index or not all(isinstance(i, (int, str)) and not isinstance(i, bool)
                                for i in index):
            raise RpcError(INVALID_PARAMS, "`index`: a list must hold index numbers or names")
        return ",".join(str(i) for i in index)
    return str(index)


@method("store.push", image=required(str), store=required(str),
        index=optional(int, str, list, default="all"), subscribe=optional(bool, default=False))
async def push_indices(call: Call, image: str, store: str, index: int | str | list[Any],
                       subscribe: bool) -> Any:
    """Job: upload indices of `image` (a number, a name, a list, or "all") to `store`
    (s3://BUCKET/PREFIX), sending only what it lacks; each index's ref is written last.
    The result lists, per index, the packs it uses and how many were sent."""
    from imagefs.store.push import push

    call.daemon.check_accepting()
    url = _store_param(store)
    selection = _selection(index)
    src = await check_path("image", image, call.peer, READ, IMAGE)
    params = {"image": image, "store": store, "index": index}
    who = history_who(call, "store.push", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            done = push(src, selection, url, progress=ctx.advance, on_total=ctx.set_total,
                        who=who)
        return {"store": store, "indices": [d.to_json() for d in done]}

    job = call.daemon.jobs.submit("store.push", params, call.peer.uid, work, lock_key=src)
    return job_answer(call, job, subscribe)


@method("store.pull", store=required(str), index=required(str, list), dest=required(str),
        subscribe=optional(bool, default=False))
async def pull_indices(call: Call, store: str, index: str | list[Any], dest: str,
                       subscribe: bool) -> Any:
    """Job: add indices of `store` (a name, a list of names, or "all") to `dest` (created
    when missing), downloading only what it lacks; all in one commit.  The result says
    their numbers in `dest` and the bytes received."""
    from imagefs.store.pull import pull

    call.daemon.check_accepting()
    url = _store_param(store)
    if isinstance(index, list) and not all(isinstance(i, str) and i for i in index):
        raise RpcError(INVALID_PARAMS, "`index`: a list must hold index names")
    selection = ",".join(index) if isinstance(index, list) else index
    path_param("dest", dest)
    out = await check_path("dest", dest, call.peer, CREATE, DEST)
    params = {"store": store, "index": index, "dest": dest}
    who = history_who(call, "store.pull", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            done = pull(url, selection, out, progress=ctx.advance, on_total=ctx.set_total,
                        who=who, wait=None)
        return done.to_json() | {"dest": dest}

    job = call.daemon.jobs.submit("store.pull", params, call.peer.uid, work, lock_key=out)
    return job_answer(call, job, subscribe)
