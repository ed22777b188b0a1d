"""images.*: what the CLI does to image files, for socket clients.

Quick reads (info, diff) and delete answer directly (the work runs in a thread of the
caller's quota, daemon.limits); capture, export and verify start a job.  Every path is
checked as the caller before any work (an image must be a regular file: a FIFO or a device
is refused before anything opens it), and the work runs with the caller's filesystem
identity (daemon.access).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from imagefs.errors import Busy, UsageError
from imagefs.format.files import open_regular
from imagefs.format.lru import WeightedLRU
from imagefs.image import Image, capture, check_level, delete

from .access import (
    CREATE,
    DEST,
    DIRECTORY,
    IMAGE,
    READ,
    WRITE,
    acting_as,
    check_path,
    path_param,
)
from .calls import history_who, in_thread_as, job_answer
from .jobs import JobContext
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required

T = TypeVar("T")

LOCK_POLL = 0.1  # how often a capture waiting for another writer's lock looks again


INDEX = (int, str)

# images.info answers by the file's identity: the commit record only changes when the file
# does (a publish appends, or rewrites a slot: size, mtime or ctime move), so a cached
# answer for the same (inode, size, times) is the answer.  Hundreds of clients polling an
# image cost a stat each instead of an open and a parse.
_described: WeightedLRU[tuple[object, ...], dict[str, Any]] = WeightedLRU(512, lambda _: 1)


def _identity(path: str, *extra: object) -> tuple[object, ...]:
    st = os.stat(path)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, *extra)


@method("images.info", image=required(str), index=optional(*INDEX),
        history=optional(bool, default=False), space=optional(bool, default=False))
async def info(call: Call, image: str, index: int | str | None, history: bool,
               space: bool) -> Any:
    """The image's figures and its indices (or one index), as `imagefs info --json`;
    `space`: also what each index's content takes and what no index uses any more (reads
    every index's records)."""
    from imagefs.space import describe_space

    path = await check_path("image", image, call.peer, READ, IMAGE)

    def describe() -> dict[str, Any]:
        key = _identity(path, index, history, space)
        doc = _described.get(key)
        if doc is None:
            with Image.open(path) as img:
                doc = img.describe(index, history)
                if space:
                    describe_space(img, doc)
            _described.put(key, doc)
        else:  # the kernel's own check, as an open would make it (never blocking)
            os.close(open_regular(path, os.O_RDONLY))
        return doc

    doc = await in_thread_as(call.peer, describe)
    return {**doc, "image": image}


@method("images.diff", image=required(str), index=required(*INDEX), other=required(*INDEX),
        summary=optional(bool, default=False))
async def diff(call: Call, image: str, index: int | str, other: int | str,
               summary: bool) -> Any:
    """What changed from `index` to `other` (paths added, removed, changed), as
    `imagefs diff --json`."""
    from imagefs.diff import diff as compare

    path = await check_path("image", image, call.peer, READ, IMAGE)

    def run() -> dict[str, Any]:
        with Image.open(path) as img:
            doc = compare(img.view(index), img.view(other)).as_json()
        return {"summary": doc["summary"]} if summary else doc

    return await in_thread_as(call.peer, run)


@method("images.delete", image=required(str), index=required(*INDEX))
async def delete_index(call: Call, image: str, index: int | str) -> Any:
    """Remove one index; later indices move down by one."""
    call.daemon.check_accepting()
    path = await check_path("image", image, call.peer, WRITE, IMAGE)
    number, entry = await in_thread_as(call.peer, delete, path, str(index), 30.0)
    return {"index": number, "name": entry.name}


@method("images.capture", image=required(str), source=required(str), name=required(str),
        description=optional(str, default=""), level=optional(int, default=None),
        compact=optional(bool, default=False), subscribe=optional(bool, default=False))
async def capture_tree(call: Call, image: str, source: str, name: str, description: str,
                       level: int | None, compact: bool, subscribe: bool) -> Any:
    """Job: capture the directory `source` as a new index `name` of `image` (created if
    missing, with the compact profile's packs if `compact`).  `level`: default 9, or 19
    with `compact`.  Cancelled, it leaves the image as it was."""
    call.daemon.check_accepting()
    if level is not None:
        check_level(level)
    if not name.strip():
        raise UsageError("`name` must not be empty")
    path_param("image", image)  # the form of both paths first
    path_param("source", source)
    path = await check_path("image", image, call.peer, CREATE, IMAGE)
    src = await check_path("source", source, call.peer, READ, DIRECTORY)
    params = {"image": image, "source": source, "name": name, "description": description,
              "level": level, "compact": compact}
    who = history_who(call, "images.capture", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            r = until_not_busy(ctx, lambda: capture(
                path, src, name, description, level, progress=ctx.advance,
                on_total=ctx.set_total, wait=0, who=who, compact=compact))
        return {"index": r.index, "name": r.name, "files": r.files, "bytes": r.bytes,
                "new_bytes": r.new_bytes, "stored_bytes": r.stored_bytes}

    job = call.daemon.jobs.submit("images.capture", params, call.peer.uid, work,
                                  lock_key=path)
    return job_answer(call, job, subscribe)


def until_not_busy(ctx: JobContext, attempt: Callable[[], T]) -> T:
    """attempt(), again every LOCK_POLL seconds while another process holds the image's
    writer lock: a wait the job's cancellation can end (the library's own wait cannot)."""
    while True:
        try:
            return attempt()
        except Busy as e:
            if type(e) is not Busy:  # a refusal that is a kind of Busy
                raise
            ctx.check()
            time.sleep(LOCK_POLL)


@method("images.export", image=required(str), index=required(int, str, list),
        dest=required(str), level=optional(int, default=None),
        compact=optional(bool, default=False), check=optional(bool, default=False),
        subscribe=optional(bool, default=False))
async def export_indices(call: Call, image: str, index: int | str | list[Any], dest: str,
                         level: int | None, compact: bool, check: bool,
                         subscribe: bool) -> Any:
    """Job: copy indices (a number, a name, a list of them, or "all") of `image` into the
    compacted file `dest` (new, or an image to add them to).  Packs they use whole are
    copied as stored; `level` recompresses everything at it, `compact` into the compact
    profile's packs (a new `dest` gets them).  Frame checksums are checked as packs are
    copied; `check` also decompresses each copied pack and checks every chunk.  Cancelled,
    a new `dest` never appears."""
    from imagefs.export import export

    call.daemon.check_accepting()
    if level is not None:
        check_level(level)
    if isinstance(index, list):
        if not index or not all(isinstance(i, (int, str)) and not isinstance(i, bool)
                                for i in index):
            raise RpcError(INVALID_PARAMS, "images.export: `index`: a list must hold index "
                           "numbers or names")
        selection = ",".join(str(i) for i in index)
    else:
        selection = str(index)
    path_param("image", image)  # the form of both paths first
    path_param("dest", dest)
    src = await check_path("image", image, call.peer, READ, IMAGE)
    out = await check_path("dest", dest, call.peer, CREATE, DEST)
    params = {"image": image, "index": index, "dest": dest, "level": level,
              "compact": compact, "check": check}
    who = history_who(call, "images.export", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            numbers = until_not_busy(ctx, lambda: export(
                src, selection, out, level, progress=ctx.advance, on_total=ctx.set_total,
                who=who, wait=0, compact=compact, check=check))
        return {"dest": dest, "indices": numbers}

    job = call.daemon.jobs.submit("images.export", params, call.peer.uid, work, lock_key=out)
    return job_answer(call, job, subscribe)


@method("images.optimize", image=required(str), level=optional(int, default=None),
        compact=optional(bool, default=False), check=optional(bool, default=False),
        subscribe=optional(bool, default=False))
async def optimize_image(call: Call, image: str, level: int | None, compact: bool,
                         check: bool, subscribe: bool) -> Any:
    """Job: rewrite `image` in place holding only what its indices reference (a new file
    beside it takes its name in one rename; its directory must be writable).  Packs used
    whole are copied as stored; `level` recompresses everything at it, `compact` into the
    compact profile's packs; `check` as export's.  Refused while the image has sessions.
    Cancelled, the image stays as it was."""
    from imagefs.optimize import optimize

    call.daemon.check_accepting()
    if level is not None:
        check_level(level)
    path = await check_path("image", image, call.peer, CREATE, IMAGE)
    params = {"image": image, "level": level, "compact": compact, "check": check}
    who = history_who(call, "images.optimize", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            done = until_not_busy(ctx, lambda: optimize(
                path, level, progress=ctx.advance, on_total=ctx.set_total, who=who, wait=0,
                compact=compact, check=check))
        return {**done.to_json(), "image": image}

    job = call.daemon.jobs.submit("images.optimize", params, call.peer.uid, work,
                                  lock_key=path)
    return job_answer(call, job, subscribe)


@method("images.verify", image=required(str), subscribe=optional(bool, default=False))
async def verify_image(call: Call, image: str, subscribe: bool) -> Any:
    """Job: read and check every byte of `image`; the result is the report (`ok`, and
    each problem with the indices and paths it affects)."""
    from imagefs.verify import verify

    call.daemon.check_accepting()
    path = await check_path("image", image, call.peer, READ, IMAGE)

    def work(ctx: JobContext) -> dict[str, Any]:
        with acting_as(call.peer):
            ctx.set_total(os.path.getsize(path))
            return verify(path, progress=ctx.advance).as_json()

    job = call.daemon.jobs.submit("images.verify", {"image": image}, call.peer.uid, work)
    return job_answer(call, job, subscribe)
