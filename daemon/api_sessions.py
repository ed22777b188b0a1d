"""sessions.*: writable mounts opened for clients, committed or discarded through the daemon.

A session's mount runs in its own process (forked from the daemon's fork server, as
`imagefs mount --rw` would start it, with the caller's uid recorded as the owner, in the
daemon's state directory), so a daemon that dies or restarts does not take the mounted
trees with it; its staging is on disk either way.  A session belongs to the uid that
opened it: nobody else but root may see its details, commit, discard or remount it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import trio

from imagefs.errors import Error, NoSuchSession
from imagefs.places import state_dir
from imagefs.session import mounts
from imagefs.session.commit_client import commit
from imagefs.session.lifecycle import SessionInfo, find_session, list_sessions

from .access import IMAGE, READ, WRITE, check_path, path_param, session_spec
from .calls import history_who, in_thread, job_answer
from .forkserver import MountRequest
from .jobs import JobContext
from .rpc import Call, method, optional, required

STOP_WAIT = 15.0  # seconds a session's mount process gets to save and unmount on shutdown

# Sessions this daemon mounts (opened, remounted, or adopted): stopped when it shuts down.
started_here: set[str] = set()


def adopt() -> list[str]:
    """At start: the sessions still mounted from before (a daemon that died leaves its
    mount processes running) become this daemon's, to commit, discard and stop."""
    live = [i.id for i in list_sessions() if i.live()]
    started_here.update(live)
    return live


def session_doc(info: SessionInfo) -> dict[str, Any]:
    live = info.live()
    return {"session": info.id, "image": info.image, "index": info.index, "name": info.name,
            "mountpoint": info.mountpoint, "pid": info.pid if live else 0,
            "state": "live" if live else "stale", "owner": info.uid, "created": info.created,
            "staged_bytes": info.staged_bytes()}


async def own_session(call: Call, spec: str) -> SessionInfo:
    """The caller's session by id or mountpoint (another user's looks like none at all)."""
    session_spec("session", spec)
    if spec.startswith("/"):
        await check_path("session", spec, call.peer, READ)
        info = await in_thread(find_session, spec)
    else:  # an id (never a name resolved against the daemon's working directory)
        info = await in_thread(SessionInfo.load, spec)
    if info.uid != call.peer.uid and not call.peer.is_root:
        raise NoSuchSession(spec)
    return info


async def mount_session(call: Call, image: str, index: int | str, mountpoint: str,
                        stale: str | None = None) -> None:
    """Mount a new session of the caller's (or the stale session `stale` again), forked
    from the daemon's fork server: root's mount, for the caller, ready when this returns
    (the mount process outlives the call and the daemon)."""
    # A member's image must not bring setuid programs or device nodes that work with it
    # (a crafted image could hold a setuid-root shell).
    confined = [] if call.peer.is_root else ["nosuid,nodev"]
    request = MountRequest(image=image, index=str(index), mountpoint=mountpoint,
                           options=confined, writable=True, session=stale,
                           owner=call.peer.uid, state_dir=state_dir())
    # Waited for (the session must be known to stop it on shutdown); the fork server gives
    # up on a mount that is not ready within its ANSWER_TIMEOUT.
    await in_thread(call.daemon.fork_server.mount, request, abandon=False)


@method("sessions.open", image=required(str), index=required(int, str),
        mountpoint=required(str))
async def open_session(call: Call, image: str, index: int | str, mountpoint: str) -> Any:
    """Mount `index` of `image` writable at `mountpoint` (an existing directory the caller
    may write) as a new session of the caller's; returns once the mount is ready."""
    call.daemon.check_accepting()
    path_param("image", image)  # the form of both paths first
    path_param("mountpoint", mountpoint)
    path = await check_path("image", image, call.peer, WRITE, IMAGE)
    where = await check_path("mountpoint", mountpoint, call.peer, WRITE)
    await mount_session(call, path, index, where)
    info = await in_thread(find_session, where)
    started_here.add(info.id)
    return await in_thread(session_doc, info)


@method("sessions.list")
async def list_own(call: Call) -> Any:
    """The caller's sessions (root: everyone's), live or stale, with bytes staged."""

    def collect() -> list[dict[str, Any]]:
        return [session_doc(i) for i in list_sessions()
                if i.uid == call.peer.uid or call.peer.is_root]

    return await in_thread(collect)


@method("sessions.commit", session=required(str), new_index=optional(str),
        subscribe=optional(bool, default=False))
async def commit_session(call: Call, session: str, new_index: str | None,
                         subscribe: bool) -> Any:
    """Job: publish the session's changes into its index (or as the new index
    `new_index`); the session stays mounted and goes on from there.  Can be cancelled only
    while queued."""
    call.daemon.check_accepting()
    info = await own_session(call, session)
    params = {"session": info.id, "new_index": new_index}
    who = history_who(call, "sessions.commit", params)

    def work(ctx: JobContext) -> dict[str, Any]:
        if not ctx.publishing():
            ctx.check()
        _, result = commit(info.id, new_index, wait=60.0, who=who)
        return {"session": info.id, **result}

    job = call.daemon.jobs.submit("sessions.commit", params, call.peer.uid, work,
                                  lock_key=await in_thread(os.path.realpath, info.image))
    return job_answer(call, job, subscribe)


@method("sessions.discard", session=required(str))
async def discard_session(call: Call, session: str) -> Any:
    """Drop the session's changes and end it (unmounting it if it is mounted)."""
    info = await own_session(call, session)

    def drop() -> None:
        if info.live():
            mounts.unmount(info.mountpoint, discard_changes=True)
        else:
            mounts.cleanup(info.id)

    await in_thread(drop)
    started_here.discard(info.id)
    return {"session": info.id, "discarded": True}


@method("sessions.remount", session=required(str), mountpoint=optional(str))
async def remount_session(call: Call, session: str, mountpoint: str | None) -> Any:
    """Mount a stale session again (after a crash of its mount process, or of the daemon)
    with every change it had saved, at its mountpoint or at `mountpoint`."""
    call.daemon.check_accepting()
    if mountpoint is not None:
        path_param("mountpoint", mountpoint)  # its form before the session is looked up
    info = await own_session(call, session)
    if mountpoint is not None:
        where = await check_path("mountpoint", mountpoint, call.peer, WRITE)
        if where != info.mountpoint:
            info.mountpoint = where
            await in_thread(info.save)
    else:
        await check_path("mountpoint", info.mountpoint, call.peer, WRITE)
    await mount_session(call, info.image, info.index, info.mountpoint, stale=info.id)
    fresh = await in_thread(SessionInfo.load, info.id)
    started_here.add(fresh.id)
    return await in_thread(session_doc, fresh)


async def stop_mounts() -> None:
    """On shutdown: end the mount processes of the sessions this daemon mounted.  Each saves
    its staging and unmounts on SIGTERM; the sessions stay, stale, for sessions.remount."""
    pending = []
    for sid in list(started_here):
        with contextlib.suppress(Error):
            info = SessionInfo.load(sid)
            if info.live():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(info.pid, signal.SIGTERM)
                pending.append(info)
    with trio.move_on_after(STOP_WAIT):
        while any(i.live() for i in pending):
            await trio.sleep(0.05)
    for info in pending:
        if mounts.find_mount(info.mountpoint) is not None:
            await trio.run_process(["umount", "-l", info.mountpoint], check=False)
    started_here.clear()

