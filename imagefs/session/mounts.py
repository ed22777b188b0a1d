"""Mounts as an admin sees them, both kinds: start one, list them, unmount one, and clean up
the sessions behind writable ones (committing one is commit_client.py's).

Read-only mounts are imagefs.mount's; a writable mount is a session (lifecycle.py) served
by a mount process, so starting, listing and unmounting one also opens, lists and ends its
session.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from imagefs.errors import Error, NotAMountPoint, SessionLive, UsageError
from imagefs.mount import process
from imagefs.mount.kernel import FSTYPE, canonical, find_mount
from imagefs.mount.process import MountPlan
from imagefs.mount.registry import MountRecord, list_records, record_for

from .info import SessionInfo, discard, find_session, list_sessions

if TYPE_CHECKING:
    from imagefs.image import Image


def start(image_path: str, index_spec: str, mountpoint: str, option_specs: list[str],
          foreground: bool = False,
          announce: Callable[[MountRecord], None] | None = None,
          writable: bool = False, session: SessionInfo | None = None,
          owner: int | None = None, not_inherited: tuple[int, ...] = (),
          tied_to: int = 0, volatile: bool = False,
          opener: Callable[[], Image] | None = None) -> MountRecord:
    """Mount an index at mountpoint: read-only, or writable as a session (a new one, or
    `session` again after a crash).  A new session is the caller's, or, when root starts
    it, owner's (the daemon opens sessions for its clients); volatile, it is never
    fsynced (a servicing transaction's, discarded if anything fails).  See
    imagefs.mount.process.start.  opener: opens the image instead of the file at
    image_path (an index of a store: read-only)."""
    rw = writable or session is not None
    if rw and opener is not None:
        raise store_read_only(image_path)

    def open_plan(path: str, cache: int | None) -> MountPlan:
        if rw:
            return _writable(image_path, index_spec, path, cache, session, owner, volatile)
        return process.read_only(image_path, index_spec, cache,
                                 opener() if opener else None)

    return process.start(open_plan, mountpoint, option_specs, writable=rw,
                         foreground=foreground, announce=announce,
                         not_inherited=not_inherited, tied_to=tied_to)


def _writable(image_path: str, index_spec: str, mountpoint: str, cache: int | None,
              session: SessionInfo | None, owner: int | None,
              volatile: bool = False) -> MountPlan:
    """A session's mount.  The parent checks everything it can (and creates a new
    session's staging); the mount process opens the session again for itself (an SQLite
    connection must not cross a fork)."""
    from .lifecycle import Session

    if session is not None:
        if session.live():
            raise SessionLive(session.id, session.pid, session.mountpoint)
        Session.load(session, cache).close()
        info, created = session, False
    else:
        new = Session.create(image_path, index_spec, mountpoint, cache, owner=owner,
                             volatile=volatile)
        new.close()
        info, created = new.info, True
    label = f"image {info.image} index {info.index} ({info.name}) session {info.id}"
    rec = MountRecord(image=info.image, index=info.index, name=info.name, mountpoint="",
                      pid=0, mode="rw", session=info.id)

    served: list[Session] = []  # in the mount process

    def make_ops() -> object:
        from .fuse import WritableOperations

        served.append(Session.load(info, cache))
        return WritableOperations(served[-1], label)

    def ready(rec: MountRecord) -> None:
        info.pid = rec.pid
        info.mountpoint = mountpoint
        info.save()

    def ended() -> None:
        with contextlib.suppress(OSError):
            fresh = SessionInfo.load(info.id)
            if fresh.pid == os.getpid():
                fresh.pid = 0
                fresh.save()
        # Last: a transaction's verb waits for this (its session's lock, staging.py), not
        # for the mount process to be gone.  (Any other session is left to the exit, as
        # before: closing SQLite would checkpoint its log here.)
        for session in served:
            if session.info.volatile:
                with contextlib.suppress(Exception):  # never instead of the process's exit
                    session.close()

    def failed() -> None:
        if created:
            with contextlib.suppress(Exception):
                discard(SessionInfo.load(info.id))

    return MountPlan(rec, label, make_ops, ready=ready, ended=ended, failed=failed)


def store_read_only(url: str) -> UsageError:
    return UsageError(f"{url}: an index of a store mounts read-only; pull it into a file to "
                      "change it (imagefs pull)")


def list_mounts() -> list[MountRecord]:
    """Every imagefs mount (imagefs.mount.registry.list_records), then the sessions no
    process serves (stale); writable mounts say whether their process is live."""
    mounts = list_records()
    by_session = {m.session: m for m in mounts if m.session}
    stale = []
    for info in list_sessions():
        rec = by_session.get(info.id)
        if rec is not None:  # still mounted: live, or its process died (stale)
            rec.state = "live" if info.live() else "stale"
            rec.staged_bytes = info.staged_bytes()
            continue
        stale.append(MountRecord(image=info.image, index=info.index, name=info.name,
                                 mountpoint=info.mountpoint, pid=0, mode="rw",
                                 started=info.created, state="stale", session=info.id,
                                 staged_bytes=info.staged_bytes()))
    return mounts + stale


def unmount(mountpoint: str, wait: float = 30.0, commit: bool = False,
            discard_changes: bool = False, new_index: str | None = None
            ) -> tuple[MountRecord, dict[str, object] | None]:
    """Unmount an imagefs mount; refuse (naming the holders) while it is in use.  A
    writable mount must be told what becomes of its changes: commit them first (then the
    session ends), or discard them with the session."""
    path = canonical(mountpoint)
    m = find_mount(path)
    if m is None or m.fstype != FSTYPE:
        raise NotAMountPoint(path)
    rec = record_for(path) or MountRecord(image=m.source, index=0, name="", mountpoint=path,
                                          pid=0, state="unregistered")
    result = None
    if commit and discard_changes:
        raise UsageError("--commit and --discard contradict each other; choose one")
    if rec.mode == "rw":
        if not commit and not discard_changes:
            raise UsageError(f"{path} is a writable mount (session {rec.session}): "
                             "unmount --commit to publish its changes, or --discard to "
                             "drop them")
        from .commit_client import refuse_a_transactions
        from .control import request

        if commit:
            refuse_a_transactions(SessionInfo.load(rec.session))
            result = request(rec.session, {"op": "commit", "new_index": new_index})
        else:
            with contextlib.suppress(Error):  # a mount that does not answer still goes
                request(rec.session, {"op": "discard"}, timeout=5)
    elif commit or new_index:
        raise UsageError(f"{path} is a read-only mount: there is nothing to commit")
    process.detach(path, rec, wait, done="changes committed, but " if result else "")
    if rec.session:  # committed or discarded: the session is over
        discard(SessionInfo.load(rec.session))
    return rec, result


def cleanup(spec: str | None) -> list[SessionInfo]:
    """Discard stale sessions (one, or all of them with spec None) and their staging."""
    if spec is not None:
        info = find_session(spec)
        discard(info)
        return [info]
    gone = []
    for info in list_sessions():
        if not info.live():
            discard(info)
            gone.append(info)
    return gone
