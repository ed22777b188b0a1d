"""The transaction every servicing verb runs in: plan, apply in a writable session, check,
then commit atomically or discard.

A verb is a `Change`: `plan` reads what it needs from a `Root` (an index read straight
from the image, or a mounted directory) and refuses, before anything changes, what cannot
be done; `apply` does it in a writable root (running the image's own tools through
servicing.runner) and checks the result, returning what it did for the index's history.

`service` runs a Change on one or more indices of an image.  Every index gets its own
session mounted writable in a private directory, tied to this process (a mount ends when
its verb does, also when the verb is killed: imagefs.mount.fuse.serve).  When every index
has been serviced the mounts are detached and all the sessions are published in ONE
commit (imagefs.session.lifecycle.commit_together), or, on any failure, none is and every
session is discarded: the image is then byte for byte as it was.  A verb killed at any
moment leaves stale sessions at worst, which `imagefs cleanup` discards.

`service_mount` runs a Change inside a writable mount the caller already has open and
leaves the commit to the caller.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from imagefs.errors import (
    ChangedWhilePlanned,
    Error,
    Interrupted,
    NotAMountPoint,
    Refused,
    ServicingFailed,
    UsageError,
    one_line,
)
from imagefs.format.decoded import decoded_packs
from imagefs.format.packs import PackReader
from imagefs.image import Image, find_index
from imagefs.places import run_dir

from .roots import IndexRoot, MountRoot, Root

if TYPE_CHECKING:
    from imagefs.format.ahead import CompressAhead
    from imagefs.format.packs import PrecompressedPack

MOUNT_WAIT = 30.0  # seconds for a detached mount's process to end
# zstd levels of a servicing commit.  What servicing adds is small (a package's files, a
# database's changed chunks) and the package files arrive xz-compressed in .debs: at 18 they
# take about the .debs' own size (jq and its two libraries: 384 KB of packs for their
# 389 KB of .debs, as at 19; 426 KB at level 9), for ~0.2 s per MB, spent ahead of the
# commit while dpkg runs (KnowsContent, imagefs.format.ahead).  Not 19: 15 % slower for
# 0.1 % less, and beside dpkg jq's first pack then took longer than dpkg (the commit waited
# 0-17 ms for it in 3 traced runs, never at 18).  The rest (dpkg's database, the records)
# is compressed in the commit itself, at 9: ~10x faster than 18, a few KB larger.
AHEAD_LEVEL = 18
COMMIT_LEVEL = 9
SUMMARY_PATHS = 20  # paths of each kind (added, removed, changed) kept in a history entry


class MountHandle(Protocol):
    """A session's mount, asked for: wait() until it is ready (raising why not; asked
    again, the same); release() once done with what was read ahead in it (Change.reads),
    and before unmounting it."""

    def wait(self) -> object: ...

    def release(self) -> None: ...


# Starts mounting index number of the image writable at a mount point (a new session), tied
# to this process, and returns its MountHandle.  The default mounts here, before it
# returns; the daemon and the CLI have a fork server do it while the verb plans, and read
# the paths given (Change.reads) in the mount once it is up.
Mounter = Callable[[str, int, str, Sequence[str]], MountHandle]


class Progress(Protocol):
    """Where a verb reports its steps: a terminal's status line, a daemon job."""

    def step(self, text: str) -> None: ...


class _Silent:
    def step(self, text: str) -> None:
        pass


@dataclass
class Target:
    """One index being serviced: the root it is mounted writable at, and which it is."""

    root: str
    index: int
    name: str
    # For the verb's own temporary files: the workspace (cleared with it, also by
    # `imagefs cleanup --all` after a kill); None: the system's temporary directory.
    scratch: str | None = None


class Plan(Protocol):
    """What a Change will do to one index, decided before anything changes."""

    def empty(self) -> bool:
        """True when there is nothing to do (already so): the index is left alone."""
        ...

    def to_json(self) -> dict[str, Any]: ...

    def lines(self) -> list[str]:
        """The plan for a terminal, one line per action."""
        ...


class Change(Protocol):
    """A servicing verb's work on one index."""

    verb: str  # as the history shows it: "package add"
    # A change may also have `reads`: paths in the image its apply will read (the image's
    # dpkg: reads.DPKG_READS), read by the mount's fork server while the plan is made
    # (imagefs.mount.warm).

    def arguments(self) -> dict[str, Any]:
        """The verb's arguments, for the history."""
        ...

    def plan(self, root: Root) -> Plan:
        """Decide what to do to the index root holds; raise a one-line Error (Refused)
        for what cannot be done.  root is read-only here."""
        ...

    def apply(self, target: Target, plan: Plan, progress: Progress) -> dict[str, Any]:
        """Do plan in target.root (writable) and check it with the image's own tools; what
        was done, for the history.  Raise ServicingFailed (or any Error) to undo all."""
        ...


@runtime_checkable
class KnowsContent(Protocol):
    """A Change that can tell, once planned, file contents its commit will store (a
    package's files): the transaction compresses them while the change is applied."""

    def expected_content(self, plans: list[Plan]) -> Iterable[bytes]: ...


@dataclass
class IndexOutcome:
    """What happened to one index."""

    index: int
    name: str
    plan: Plan
    result: dict[str, Any] | None = None
    commit: dict[str, Any] | None = None
    root: int = 0  # the index's root when it was planned

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name,
                "plan": {**self.plan.to_json(), "lines": self.plan.lines()},
                "result": self.result, "commit": self.commit}


@dataclass
class Outcome:
    """What a servicing verb did: per index, its plan and (unless a dry run) its result."""

    image: str
    verb: str
    dry_run: bool
    indices: list[IndexOutcome] = field(default_factory=list)
    committed: bool = False
    mount: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "verb": self.verb, "dry_run": self.dry_run,
                "mount": self.mount, "committed": self.committed,
                "indices": [i.to_json() for i in self.indices]}


def service(image_path: str, index_spec: str, change: Change | Callable[[], Change], *,
            new_index: str | None = None, dry_run: bool = False,
            who: dict[str, Any] | None = None, progress: Progress | None = None,
            publishing: Callable[[], bool] | None = None,
            wait: float | None = 60.0, mounter: Mounter | None = None,
            reads: Sequence[str] = ()) -> Outcome:
    """Run change on the indices index_spec names ("2", "web", "1,3", "all") of the
    image: all of them are published in one commit, or none.  publishing() is asked just
    before the commit (False: stop, nothing is published; a daemon job's cancel).
    change may be what makes it, called once the mounts were asked for (the CLI imports
    the verb's module then: ~25 ms more for them to come up), with its reads given."""
    progress = progress or _Silent()
    with contextlib.ExitStack() as stack:
        with Image.open(image_path) as img:
            chosen = img.select_many(index_spec)
            if new_index is not None and len(chosen) > 1:
                raise UsageError("--new-index takes the change of one index; "
                                 f"{index_spec!r} names {len(chosen)}")
            # Every index's session is mounted while the plans are made (by a fork server,
            # on the other CPU); one with nothing to do is discarded with the workspace.
            mounting = ({} if dry_run else
                        _start(image_path, [(n, e.name) for n, e in chosen],
                               stack.enter_context(_workspace()), progress, mounter,
                               reads if callable(change) else _reads(change)))
            # However this ends, every mount asked for is made (or failed) before the
            # workspace is cleared: a mount made after that would outlive it.
            stack.callback(_settle, mounting.values())
            change = change() if callable(change) else change
            outcome = Outcome(os.path.abspath(image_path), change.verb, dry_run)
            # The plan's reads keep the packs they decompress for the mounts (decoded.py).
            packs = PackReader(img.file, decoded=decoded_packs())
            for number, entry in chosen:
                progress.step(f"planning index {number} ({entry.name})")
                plan = _plan(change, IndexRoot(img.view(number, packs)), number, entry.name)
                outcome.indices.append(IndexOutcome(number, entry.name, plan,
                                                    root=entry.root))
        todo = [i for i in outcome.indices if not i.plan.empty() or new_index is not None]
        if dry_run or not todo:
            return outcome
        with contextlib.ExitStack() as compressing:
            # A thread may start only once no mount is left to fork from this process
            # (mount_here): a fork while another thread runs may copy a lock that thread
            # holds (an import's) into a child that then hangs.  A fork server's mounts
            # (the CLI's and the daemon's) fork nothing here: compressing starts before
            # they are up (jq and its two libraries: ~0.2 s at zstd 18, else waited for).
            targets = None if mounter is not None else _wait_all(mounting, todo)
            importing = _importing_the_commit()
            ahead = compressing.enter_context(_compressing_ahead(image_path, change, todo))
            targets = targets or _wait_all(mounting, todo)
            _unchanged_since_planned(image_path, todo)
            for item, target in zip(todo, targets, strict=True):
                progress.step(f"servicing index {item.index} ({item.name})")
                # Nothing to do but a new index (--new-index): the index's tree as it is.
                item.result = (_apply(change, target, item, progress)
                               if not item.plan.empty() else {})
            progress.step("checking and committing")
            for item, target in zip(todo, targets, strict=True):
                mounting[item.index].release()
                _detach(target.root, wait=0)
            if publishing is not None and not publishing():
                raise Interrupted()
            importing.join()
            results = _commit(targets, todo, change, new_index, who, wait,
                              ahead.packs() if ahead else None)
    for item, result in zip(todo, results, strict=True):
        item.commit = result
    outcome.committed = any(r.get("changed") for r in results)
    return outcome


def _reads(change: Change) -> Sequence[str]:
    return tuple(getattr(change, "reads", ()))


def _wait_all(mounting: dict[int, _Mounting], todo: list[IndexOutcome]) -> list[Target]:
    """Each serviced index's mount, once it is up."""
    return [mounting[item.index].wait() for item in todo]


def _importing_the_commit() -> threading.Thread:
    """Import what the commit runs in a thread of its own, while the change is applied
    (the verb waits for the image's programs then), rather than after it, when everything
    waits for the commit, or before it, when the sessions' mounts are up already (a fork
    server's, for `package add` of hello, ~10 ms before the plan is made): 10-18 ms.
    (A daemon has them from its first commit.)"""

    def imports() -> None:
        import imagefs.diff  # noqa: F401
        import imagefs.session.commit  # noqa: F401
        import imagefs.session.lifecycle  # noqa: F401

    thread = threading.Thread(target=imports, name="importing-the-commit", daemon=True)
    thread.start()
    return thread


def service_mount(mountpoint: str, change: Change, *, dry_run: bool = False,
                  progress: Progress | None = None) -> Outcome:
    """Run change in the writable imagefs mount at mountpoint; the commit is the caller's."""
    from imagefs.mount.kernel import canonical
    from imagefs.session.lifecycle import find_session

    progress = progress or _Silent()
    path = canonical(mountpoint)
    try:
        info = find_session(path)
    except Error:
        raise NotAMountPoint(path) from None
    if not info.live() or info.mountpoint != path:
        raise UsageError(f"{path}: not a live writable imagefs mount (imagefs mount --rw)")
    outcome = Outcome(info.image, change.verb, dry_run, mount=path)
    progress.step(f"planning {path}")
    plan = _plan(change, MountRoot(path), info.index, info.name)
    item = IndexOutcome(info.index, info.name, plan)
    outcome.indices.append(item)
    if dry_run or plan.empty():
        return outcome
    progress.step(f"servicing {path}")
    item.result = _apply(change, Target(path, info.index, info.name), item, progress)
    return outcome


@contextlib.contextmanager
def opened(image_path: str, index_spec: str, mounter: Mounter | None = None,
           reads: Sequence[str] = ()) -> Iterator[Target]:
    """An index mounted writable in a private place for a look inside with the image's own
    tools (a health scan's dpkg --verify); whatever happens there is discarded.  reads: as
    Change.reads."""
    with Image.open(image_path) as img:
        number, entry = img.select(index_spec)
    with _workspace() as place:
        mounting = _start(image_path, [(number, entry.name)], place, _Silent(), mounter,
                          reads)
        try:
            target = mounting[number].wait()
        finally:
            _settle(mounting.values())
        yield target


class _NoPlan:
    def empty(self) -> bool:
        return True

    def to_json(self) -> dict[str, Any]:
        return {}

    def lines(self) -> list[str]:
        return []


def _plan(change: Change, root: Root, number: int, name: str) -> Plan:
    try:
        return change.plan(root)
    except Refused as e:
        raise Refused(f"index {number} ({one_line(name)}): {e.message()}") from None


def _apply(change: Change, target: Target, item: IndexOutcome,
           progress: Progress) -> dict[str, Any]:
    try:
        return change.apply(target, item.plan, progress)
    except ServicingFailed as e:
        raise ServicingFailed(f"index {item.index} ({one_line(item.name)}): {e.what}; "
                              "nothing was changed", e.output) from None


@contextlib.contextmanager
def _workspace() -> Iterator[str]:
    """A private directory for this verb's mount points (RUN_DIR/servicing/PID-TOKEN),
    emptied and removed afterwards, whatever happened: every mount in it is unmounted and
    its session discarded."""
    base = os.path.join(run_dir(), "servicing")
    os.makedirs(base, mode=0o700, exist_ok=True)
    place = os.path.join(base, f"{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(place, 0o700)
    try:
        yield place
    finally:
        _clear(place)


@contextlib.contextmanager
def _compressing_ahead(image_path: str, change: Change, todo: list[IndexOutcome]
                       ) -> Iterator[CompressAhead | None]:
    """What change will store, compressed at the commit's level while it is applied
    (imagefs.format.ahead), for a change that knows it; stopped however the block ends."""
    if not isinstance(change, KnowsContent):
        yield None
        return
    from imagefs.format.ahead import CompressAhead

    plans = [item.plan for item in todo]
    ahead = CompressAhead(image_path, AHEAD_LEVEL,
                          lambda: change.expected_content(plans)).start()
    try:
        yield ahead
    finally:
        ahead.stop()  # after the commit took its packs: nothing left to wait for


def _start(image_path: str, indices: list[tuple[int, str]], place: str, progress: Progress,
           mounter: Mounter | None, reads: Sequence[str]) -> dict[int, _Mounting]:
    """Start mounting a new session of each index (number, name) in place, its reads
    read in it once it is up (a fork server's mounter)."""
    started = {}
    for number, name in indices:
        mnt = os.path.join(place, str(number))
        os.mkdir(mnt, 0o700)
        progress.step(f"opening a session of index {number} ({name})")
        started[number] = _Mounting((mounter or mount_here)(image_path, number, mnt, reads),
                                    Target(mnt, number, name, scratch=place))
    return started


class _Mounting:
    """A session's mount, asked for (its MountHandle), and where it is."""

    def __init__(self, handle: MountHandle, target: Target) -> None:
        self.handle = handle
        self.target = target

    def wait(self) -> Target:
        self.handle.wait()
        return self.target

    def release(self) -> None:
        self.handle.release()


def _settle(mounting: Iterable[_Mounting]) -> None:
    """Wait until each mount asked for is made or failed (its failure is not this
    caller's concern: it is cleaning up), and release it."""
    for m in mounting:
        with contextlib.suppress(Exception):
            m.wait()
        with contextlib.suppress(Exception):
            m.release()


def _unchanged_since_planned(image_path: str, todo: list[IndexOutcome]) -> None:
    """Refuse (Busy) when another writer changed an index between its plan and its
    session: the plan may no longer hold."""
    with Image.open(image_path) as img:
        for item in todo:
            found = find_index(img.indices, item.name, by_number=False)
            if found is None or found[1].root != item.root:
                raise ChangedWhilePlanned(image_path, f"{item.index} ({item.name})")


def mount_here(image_path: str, number: int, mountpoint: str, reads: Sequence[str]
               ) -> MountHandle:
    """The default Mounter: a session's mount process started by this process (ready when
    this returns; nothing is read ahead, as nothing would run meanwhile)."""
    from imagefs.session.mounts import start

    start(image_path, str(number), mountpoint, [], writable=True, tied_to=os.getpid(),
          volatile=True)
    return _Mounted()


class _Mounted:
    """mount_here's MountHandle: ready, and nothing to let go of."""

    def wait(self) -> object:
        return None

    def release(self) -> None:
        pass


def _detach(mnt: str, wait: float = MOUNT_WAIT) -> None:
    """Unmount a serviced index and wait up to wait seconds for its process to end; its
    session stays (stale) for the commit.  The commit waits for the session instead
    (Session.load): the mount process lets go of it before it ends (~5 ms sooner)."""
    from imagefs.mount.process import detach
    from imagefs.mount.registry import record_for

    rec = record_for(mnt)
    if rec is None:
        raise ServicingFailed(f"the mount at {mnt} went away before the commit")
    detach(mnt, rec, wait)


def _commit(targets: list[Target], todo: list[IndexOutcome], change: Change,
            new_index: str | None, who: dict[str, Any] | None,
            wait: float | None, offered: list[PrecompressedPack] | None = None
            ) -> list[dict[str, Any]]:
    from imagefs.session.lifecycle import Session, commit_together, find_session

    sessions = []
    try:
        for target in targets:
            sessions.append(Session.load(find_session(target.root)))
        histories = [_history(change, item, session, who)
                     for item, session in zip(todo, sessions, strict=True)]
        return commit_together(sessions, histories, new_index, wait=wait,
                               level=COMMIT_LEVEL, offered=offered)
    finally:
        for session in sessions:
            session.close()


def _history(change: Change, item: IndexOutcome, session: Any,
             who: dict[str, Any] | None) -> Callable[[Any], dict[str, Any]]:
    """The history entry of item's index, made once its new tree is written."""
    from imagefs.format.writer import history_entry

    def entry(written: Any) -> dict[str, Any]:
        return history_entry(change.verb, who, arguments=change.arguments(),
                             result=item.result or {},
                             paths=_summary(session, written))

    return entry


def _summary(session: Any, written: Any) -> dict[str, Any]:
    """Paths added, removed and changed by the session: counts, and the first few of each."""
    from dataclasses import replace

    from imagefs.diff import diff
    from imagefs.format.view import IndexView

    base = session.tree.base.view
    new = IndexView(base.image, base.number,
                    replace(base.entry, root=written.root, digest=written.digest.hex()))
    d = diff(base, new)
    return {"added": len(d.added), "removed": len(d.removed), "changed": len(d.changed),
            "first": {"added": d.added[:SUMMARY_PATHS], "removed": d.removed[:SUMMARY_PATHS],
                      "changed": [p for p, _w in d.changed[:SUMMARY_PATHS]]}}


def _clear(place: str) -> None:
    """Unmount what is mounted in place, discard the sessions mounted there, remove it."""
    from imagefs.mount.kernel import find_mount, umount, wait_ended
    from imagefs.session.lifecycle import discard, list_sessions

    for name in sorted(os.listdir(place)) if os.path.isdir(place) else []:
        mnt = os.path.join(place, name)
        if find_mount(mnt) is not None:
            with contextlib.suppress(Error):
                _detach(mnt)
            if find_mount(mnt) is not None:
                umount(mnt, lazy=True)
    for info in list_sessions():
        if info.mountpoint.startswith(place + os.sep):
            # A mount detached for the commit (_detach without waiting) may still be
            # writing its session: it is discarded once its process has ended.
            wait_ended(info.pid, MOUNT_WAIT)
            with contextlib.suppress(Error):
                discard(info)
    shutil.rmtree(place, ignore_errors=True)


def cleanup_workspaces() -> list[str]:
    """After a servicing verb was killed: clear the workspaces whose process is gone (their
    mounts ended with it; their sessions are discarded).  The workspaces cleared."""
    from imagefs.mount.kernel import pid_alive

    base = os.path.join(run_dir(), "servicing")
    gone = []
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _clear(os.path.join(base, name))
            gone.append(os.path.join(base, name))
    return gone
