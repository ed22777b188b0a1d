"""Put back damaged package files (DISM /RestoreHealth /Source), as a servicing Change.

What a scan found damaged or missing (package files, never conffiles: drift is the
admin's) is put back when its correct content is known: the file at the same path in a
source index (--source IMAGE:INDEX) whose md5 is the one the damaged image's own
info/PKG.md5sums records, or the member of the exact package version's .deb in a folder
(--debs DIR: Package, Version and Architecture as the image's dpkg database says, and
again the md5 checked).  Nothing else is ever written: a source that differs is not used.

A file is written whole through the writable mount, with the source's owner, mode and
mtime (and the source index's xattrs); the commit cuts it into the same chunks as the
source's, so a file put back from another index of the same image stores no new content.
Then the image's dpkg --verify runs again in the same session, before the commit: a file
put back that still fails makes the whole change fail, and nothing is committed.

What cannot be put back (no source holds it, the source differs, the image file's own
chunks are damaged, a package in a bad state) is listed; what could be is committed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import UsageError
from imagefs.image import Image

from .health import recorded_or_fresh, save
from .health_scan import (
    Database,
    FileFinding,
    PackageFindings,
    ScanReport,
    deferred,
    one_index,
    pending_firstboot,
    scan_packages,
)
from .health_sources import DebSource, IndexSource, Owners
from .roots import IndexRoot, MountRoot, Root
from .transaction import Mounter, Outcome, Progress, ServicingFailed, Target, service, service_mount


@dataclass
class Restorable:
    """A damaged file whose right content a source holds."""

    path: str
    package: str
    md5: str
    source: str  # "IMAGE:INDEX" or the .deb's path
    member: str  # the file's path in the source index, or its tar member's name
    uid: int
    gid: int
    mode: int
    mtime_ns: int
    size: int
    xattrs: list[list[str]] | None = None  # [name, value hex]; None: keep the file's own
    from_deb: bool = False


@dataclass
class NotRestorable:
    path: str
    packages: list[str]
    why: str


@dataclass
class RestorePlan:
    restore: list[Restorable] = field(default_factory=list)
    cannot: list[NotRestorable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # .debs that could not be read, ...

    def empty(self) -> bool:
        return not self.restore

    def to_json(self) -> dict[str, Any]:
        return {"restore": [asdict(r) for r in self.restore],
                "cannot": [asdict(c) for c in self.cannot], "notes": self.notes}

    def lines(self) -> list[str]:
        out = [f"restore {r.path} ({r.package}) from {r.source}" for r in self.restore]
        out += [f"cannot restore {c.path}"
                + (f" ({', '.join(c.packages)})" if c.packages else "") + f": {c.why}"
                for c in self.cannot]
        return out + [f"note: {n}" for n in self.notes]


class RestoreChange:
    """health restore as a servicing Change: plan from a scan's findings, apply by writing
    the files, check by scanning again."""

    verb = "health restore"

    def __init__(self, source: str | None = None, debs: str | None = None) -> None:
        if source is None and debs is None:
            raise UsageError("give where the right files are: --source IMAGE:INDEX "
                             "and/or --debs DIR")
        self.index_source = IndexSource(source) if source is not None else None
        try:
            self.deb_source = DebSource(debs) if debs is not None else None
        except BaseException:
            if self.index_source is not None:
                self.index_source.close()  # the caller gets no change to close
            raise
        self.scan: ScanReport | None = None  # what to restore: set before planning
        self.after: PackageFindings | None = None  # the scan in the session, after
        self.firstboot: list[dict[str, str]] = []

    def close(self) -> None:
        """Close the sources (the source image, the .debs' kept members): when the change
        is done, whatever happened."""
        for source in (self.index_source, self.deb_source):
            if source is not None:
                source.close()

    def __enter__(self) -> RestoreChange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def arguments(self) -> dict[str, Any]:
        return {"source": self.index_source.spec if self.index_source else None,
                "debs": self.deb_source.directory if self.deb_source else None}

    def plan(self, root: Root) -> RestorePlan:
        scan = self.scan
        if scan is None:
            raise UsageError("health restore: no scan to plan from")
        if isinstance(root, IndexRoot) and root.view.number != scan.index:
            raise UsageError(f"health restore planned from a scan of index {scan.index}, "
                             f"not {root.view.number}")
        plan = RestorePlan(notes=list(self.deb_source.notes) if self.deb_source else [])
        db = Database(root)
        owners = Owners(root)
        for path, why in scan.chunk_files.items():
            plan.cannot.append(NotRestorable(path, db.owners(path), f"the image file's "
                               f"chunks of it are damaged ({why}); health restore cannot "
                               "replace chunks: restore the image file from a copy"))
        findings = [f for f in scan.packages.damaged if f.path not in scan.chunk_files]
        for finding, got in zip(findings, self._find_all(db, owners, findings), strict=True):
            if isinstance(got, Restorable):
                plan.restore.append(got)
            else:
                plan.cannot.append(NotRestorable(finding.path, finding.packages, got))
        plan.cannot += [NotRestorable("", [b.package], f"{b.problem} (dpkg --audit): "
                                      "health restore puts back files, not package states")
                        for b in scan.packages.bad_states]
        plan.cannot += [NotRestorable("", [], e) for e in scan.packages.errors]
        return plan

    def _find_all(self, db: Database, owners: Owners, findings: list[FileFinding]
                  ) -> list[Restorable | str]:
        """Where the right content of each file is, or why there is none.  Each source in
        turn is asked about every file the ones before it did not hold (the .debs told
        them all first, so that each .deb is read once)."""
        got: list[Restorable | str | tuple[str, str]] = [
            _askable(db, f.path, f.packages) for f in findings]
        reasons: list[list[str]] = [[] for _ in findings]
        for source in (self.index_source, self.deb_source):
            if source is None:
                continue
            todo = [(i, f.path, g) for i, (f, g) in enumerate(zip(findings, got, strict=True))
                    if isinstance(g, tuple)]
            if isinstance(source, DebSource):
                source.want(db, [(path, md5) for _i, path, (_pkg, md5) in todo])
            for i, path, (pkg, md5) in todo:
                found = source.find(db, path, pkg, md5)
                if isinstance(found, str):
                    reasons[i].append(found)
                    continue
                uid, gid, mode = owners.resolve(found, db.package_path(path))
                got[i] = Restorable(path, pkg, md5, found.source, found.member, uid, gid,
                                    mode, found.mtime_ns, found.size, found.xattrs,
                                    found.by_name)
        return ["; ".join(why) if isinstance(g, tuple) else g
                for g, why in zip(got, reasons, strict=True)]

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, RestorePlan)
        root = MountRoot(target.root)
        restored, failed = [], []
        for item in plan.restore:
            progress.step(f"restoring {item.path}")
            why = put_back(root, item, self._content(item))
            if why is None:
                restored.append({"path": item.path, "package": item.package,
                                 "source": item.source})
            else:
                failed.append(NotRestorable(item.path, [item.package], why))
        progress.step("scanning again (dpkg --verify)")
        scan = self.scan
        assert scan is not None
        after = scan_packages(target.root, set(scan.chunk_files))
        self.firstboot = pending_firstboot(root)
        deferred(after, self.firstboot)
        still = sorted({f.path for f in after.damaged} & {r["path"] for r in restored})
        if still:
            raise ServicingFailed(f"{len(still)} file(s) still fail dpkg --verify after "
                                  f"being put back: {', '.join(still[:5])}")
        self.after = after
        return {"restored": restored,
                "not_restored": [asdict(c) for c in plan.cannot + failed],
                "healthy_after": not (after.damaged or after.bad_states or after.errors
                                      or scan.chunk_files or scan.chunk_problems),
                "after": {"damaged": len(after.damaged), "drift": len(after.drift),
                          "bad_states": len(after.bad_states)}}

    def _content(self, item: Restorable) -> Iterator[bytes]:
        if item.from_deb:
            assert self.deb_source is not None
            return self.deb_source.content(item.source, item.member)
        assert self.index_source is not None
        return self.index_source.content(item.member)


def _askable(db: Database, path: str, packages: list[str]) -> tuple[str, str] | str:
    """(package, md5) to ask the sources about path with, or why there is no asking."""
    parts = path.split("/")
    if not path.startswith("/") or not parts[-1] or {".", ".."} & set(parts):
        return "not a plain absolute path"
    if len(packages) != 1:
        return ("no package owns it" if not packages else
                f"owned by several packages ({', '.join(packages)})")
    pkg = packages[0]
    md5 = db.expected_md5(path, pkg)
    if md5 is None:
        return f"{pkg}'s md5sums do not list it"
    if not _has_parent(db.root, path):
        return f"its directory {posixpath.dirname(path)} is missing"
    return pkg, md5


def _has_parent(root: Root, path: str) -> bool:
    return root.names(posixpath.dirname(path) or "/") is not None


def put_back(root: MountRoot, item: Restorable, content: Iterator[bytes]) -> str | None:
    """Write item's content at its path in the writable root, whole, with its owner, mode,
    xattrs and mtime; None when done, else why not.  A regular file there is rewritten in
    place (its other hard links are the same file, damaged alike); anything else is
    replaced by a new file renamed over it."""
    parent, name = posixpath.split(item.path)
    real = root.resolve(parent or "/")
    if real is None or not os.path.isdir(real):
        return f"its directory {parent} is missing"
    dfd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            return "a directory is in its place"
        in_place = st is not None and stat.S_ISREG(st.st_mode)
        where = name if in_place else f".{name}.imagefs-restore"
        flags = os.O_WRONLY | os.O_NOFOLLOW | (os.O_TRUNC if in_place else
                                                os.O_CREAT | os.O_EXCL)
        fd = os.open(where, flags, 0o600, dir_fd=dfd)
        try:
            digest = _write(fd, content)
            if digest != item.md5:
                raise ServicingFailed(f"{item.path}: the content read from {item.source} "
                                      "changed since the plan (md5 differs); nothing was "
                                      "committed")
            os.fchown(fd, item.uid, item.gid)
            os.fchmod(fd, item.mode)
            if item.xattrs is not None:
                _set_xattrs(fd, item.xattrs)
        finally:
            os.close(fd)
        if not in_place:
            os.rename(where, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.utime(name, ns=(item.mtime_ns, item.mtime_ns), dir_fd=dfd, follow_symlinks=False)
        return None
    finally:
        os.close(dfd)


def _write(fd: int, content: Iterator[bytes]) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    for data in content:
        view = memoryview(data)
        md5.update(view)
        while view:
            view = view[os.write(fd, view):]
    return md5.hexdigest()


def _set_xattrs(fd: int, xattrs: list[list[str]]) -> None:
    wanted = {name: bytes.fromhex(value) for name, value in xattrs}
    for name in os.listxattr(fd):
        if name not in wanted:
            with contextlib.suppress(OSError):
                os.removexattr(fd, name)
    for name, value in wanted.items():
        try:
            os.setxattr(fd, name, value)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def restore(image_path: str, index_spec: str, *, source: str | None = None,
            debs: str | None = None, new_index: str | None = None, dry_run: bool = False,
            who: dict[str, Any] | None = None, progress: Progress | None = None,
            publishing: Any = None, mounter: Mounter | None = None) -> Outcome:
    """health restore IMAGE INDEX: plan from the index's last scan (a fresh one if the
    index changed since, or was never scanned), put back what can be, scan again, commit.
    The index's new state is recorded as its last scan."""
    with RestoreChange(source, debs) as change:  # sources checked before anything else
        change.scan = recorded_or_fresh(image_path, one_index(index_spec), progress, mounter)
        outcome = service(image_path, str(change.scan.index), change, new_index=new_index,
                          dry_run=dry_run, who=who, progress=progress,
                          publishing=publishing, mounter=mounter)
    if outcome.committed and change.after is not None:
        _record_after(image_path, outcome, change, progress)
    return outcome


def restore_mount(mountpoint: str, *, source: str | None = None, debs: str | None = None,
                  dry_run: bool = False, progress: Progress | None = None) -> Outcome:
    """health restore --mount MNT: scan the writable mount, put back what can be there;
    the commit is the caller's."""
    from .health_scan import scan_mount

    with RestoreChange(source, debs) as change:
        change.scan = scan_mount(mountpoint, progress)
        return service_mount(mountpoint, change, dry_run=dry_run, progress=progress)


def _record_after(image_path: str, outcome: Outcome, change: RestoreChange,
                  progress: Progress | None) -> None:
    """Record the committed index's state: the scan made in the session before the commit,
    with the chunks of the index as committed."""
    from imagefs.verify import verify_index

    from .health_scan import Silent, chunk_progress, note_chunks, now

    commit = outcome.indices[0].commit or {}
    with Image.open(image_path) as img:
        number, entry = img.select(int(commit.get("index", 0)) or outcome.indices[0].index)
        if entry.digest != commit.get("digest"):
            return  # another writer came between: the record would not be this index's
        uuid = img.file.header.uuid.hex()
    assert change.after is not None
    report = ScanReport(os.path.abspath(image_path), uuid, number, entry.name, entry.root,
                        entry.digest, now(), packages=change.after,
                        firstboot=change.firstboot)
    note_chunks(report, verify_index(image_path, number,
                                       chunk_progress(progress or Silent())))
    save(report)


def restore_exit_code(doc: dict[str, Any]) -> int:
    """health restore's exit code from its outcome (JSON): 0 when everything damaged was
    put back and the index is healthy, 1 otherwise."""
    for item in doc.get("indices", []):
        if (item.get("plan") or {}).get("cannot"):
            return 1
        result = item.get("result")
        if result is not None and (result.get("not_restored")
                                   or not result.get("healthy_after", True)):
            return 1
    return 0


