"""Health scan of an index (DISM /ScanHealth) and the answer from the last one (/CheckHealth).

A scan makes one report of everything that says whether an index is intact:

- chunks of the index that fail their checksums (imagefs.verify.verify_index: the image
  file itself is damaged there);
- package files that are missing or whose content differs from their package's md5sums,
  found by the image's own `dpkg --verify` run in its container on a private writable
  mount (servicing.transaction.opened, always discarded), so the image's dpkg decides;
- changed configuration files, listed apart: an admin edits conffiles, that is drift and
  not damage;
- packages in a bad state (`dpkg --audit`);
- pending first-boot items.

dpkg --verify and --audit exit 0 whatever they find: their output is parsed.  dpkg --verify
gives up on the first file it cannot read (a file on a damaged chunk reads as EIO), so
when chunks are damaged the packages owning those files are left out of its run; their
files are reported from the chunk check.

servicing.health records the last scan of each index; servicing.health_restore puts
damaged files back.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from imagefs.errors import CorruptImage, Error, UsageError
from imagefs.image import Image

from .packages import ADMINDIR, Package, parse_status
from .roots import IndexRoot, MountRoot, Root
from .runner import run
from .transaction import Mounter, Progress, ServicingFailed, opened

INFO = f"{ADMINDIR}/info"
# package add --defer-configure's first-boot item, and the dpkg --audit findings it ends
DEFERRED_ITEM = "configure-packages"
DEFERRABLE = ("The following packages have been unpacked but not yet configured",
              "The following packages have been triggered, but the trigger processing",
              "The following packages are awaiting processing of triggers")
RECORD_FORMAT = 1  # of ScanReport.to_json, as recorded
DPKG_TIMEOUT = 3600.0  # seconds: dpkg --verify reads every package file once
# dpkg --verify's line: 9 result characters, the conffile mark, the path (and, for a file
# that cannot be looked at for another reason than ENOENT, " (strerror)").
_VERIFY_LINE = re.compile(r"(.{9}) ([c ]) (/.*)\Z", re.S)


class Silent:
    """A Progress that shows nothing."""

    def step(self, text: str) -> None:
        pass


@dataclass
class FileFinding:
    """A package file dpkg --verify reports."""

    path: str
    problem: str  # "missing", "content differs", "not a regular file", "unreadable"
    detail: str  # dpkg's own words: "??5??????", "missing", "missing (Permission denied)"
    packages: list[str] = field(default_factory=list)
    conffile: bool = False


@dataclass
class BadState:
    """A package dpkg --audit reports, and what it says about it."""

    package: str
    problem: str


@dataclass
class PackageFindings:
    """What the image's dpkg says about the files and states of its packages."""

    damaged: list[FileFinding] = field(default_factory=list)
    drift: list[FileFinding] = field(default_factory=list)
    bad_states: list[BadState] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # a check that could not run wholly
    deferred: list[BadState] = field(default_factory=list)  # configured at the first boot


@dataclass
class ScanReport:
    """One scan of one index (or of a writable mount of it)."""

    image: str
    uuid: str
    index: int
    name: str
    root: int
    digest: str
    scanned: str
    mount: str | None = None
    chunks_checked: int = 0
    chunk_problems: list[str] = field(default_factory=list)
    chunk_files: dict[str, str] = field(default_factory=dict)  # path -> why
    packages: PackageFindings = field(default_factory=PackageFindings)
    firstboot: list[dict[str, str]] = field(default_factory=list)  # id, name, state, origin

    @property
    def healthy(self) -> bool:
        p = self.packages
        return not (self.chunk_problems or p.damaged or p.bad_states or p.errors)

    def counts(self) -> dict[str, int]:
        p = self.packages
        return {"chunk_problems": len(self.chunk_problems),
                "chunk_files": len(self.chunk_files), "damaged": len(p.damaged),
                "missing": sum(1 for f in p.damaged if f.problem == "missing"),
                "drift": len(p.drift), "bad_states": len(p.bad_states),
                "errors": len(p.errors), "deferred": len(p.deferred),
                "firstboot": len(self.firstboot)}

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(format=RECORD_FORMAT, healthy=self.healthy, counts=self.counts())
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ScanReport:
        p = doc["packages"]
        found = PackageFindings([FileFinding(**f) for f in p["damaged"]],
                                [FileFinding(**f) for f in p["drift"]],
                                [BadState(**b) for b in p["bad_states"]], list(p["errors"]),
                                [BadState(**b) for b in p["deferred"]])
        keep = {k: v for k, v in doc.items()
                if k not in ("packages", "format", "healthy", "counts")}
        return cls(**keep, packages=found)


def scan_index(image_path: str, index_spec: str, progress: Progress | None = None,
               mounter: Mounter | None = None) -> ScanReport:
    """Scan an index (servicing.health.scan also records the report)."""
    from imagefs.verify import verify_index

    progress = progress or Silent()
    image_path = os.path.abspath(image_path)
    with Image.open(image_path) as img:
        uuid = img.file.header.uuid.hex()
        number, entry = img.select(one_index(index_spec))
        require_debian(IndexRoot(img.view(number)))
    report = ScanReport(image_path, uuid, number, entry.name, entry.root, entry.digest,
                        now())
    note_chunks(report, verify_index(image_path, number, chunk_progress(progress)))
    progress.step(f"opening a session of index {number} ({entry.name})")
    with opened(image_path, str(number), mounter) as target:
        _look_inside(report, target.root, progress)
    return report


def scan_mount(mountpoint: str, progress: Progress | None = None) -> ScanReport:
    """Scan inside a writable mount (imagefs mount --rw): its files as they are now, and
    the chunks of the index it was opened from.  Not recorded: the session is not the
    index."""
    from imagefs.mount.kernel import canonical
    from imagefs.session.lifecycle import find_session
    from imagefs.verify import verify_index

    progress = progress or Silent()
    path = canonical(mountpoint)
    try:
        info = find_session(path)
    except Error:
        info = None
    if info is None or not info.live() or info.mountpoint != path:
        raise UsageError(f"{path}: not a live writable imagefs mount (imagefs mount --rw)")
    require_debian(MountRoot(path))
    chunks = verify_index(info.image, info.name, chunk_progress(progress))
    report = ScanReport(info.image, info.uuid, chunks.number, info.name, chunks.root,
                        chunks.digest, now(), mount=path)
    note_chunks(report, chunks)
    _look_inside(report, path, progress)
    return report


def require_debian(root: Root, what: str = "") -> None:
    """Refuse, in one line, a root without a dpkg database."""
    if root.read(f"{ADMINDIR}/status") is None:
        raise UsageError(f"{what}{root.label} is not a Debian root (no {ADMINDIR}/status)")


def one_index(spec: str) -> str:
    """Health works on one index at a time."""
    if spec == "all" or "," in spec:
        raise UsageError(f"{spec!r}: health scans and restores one index at a time")
    return spec


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def chunk_progress(progress: Progress) -> Callable[[int], None]:
    """verify_index's progress (bytes read) as steps, one per 4 MiB."""
    done = shown = 0

    def advance(n: int) -> None:
        nonlocal done, shown
        done += n
        if done - shown >= 4 << 20 or not shown:
            shown = done
            progress.step(f"checking the index's chunks: {done >> 20} MiB read")

    return advance


def note_chunks(report: ScanReport, chunks: Any) -> None:
    report.chunks_checked = chunks.chunks
    report.chunk_problems = [p.what for p in chunks.problems]
    report.chunk_files = dict(sorted(chunks.damaged.items()))


def _look_inside(report: ScanReport, root_dir: str, progress: Progress) -> None:
    """The package and first-boot parts of report, from the writable root at root_dir."""
    report.packages = scan_packages(root_dir, set(report.chunk_files), progress)
    report.firstboot = pending_firstboot(MountRoot(root_dir))
    deferred(report.packages, report.firstboot)


def scan_packages(root_dir: str, unreadable: Collection[str] = (),
                  progress: Progress | None = None) -> PackageFindings:
    """dpkg --verify and dpkg --audit of the root at root_dir (writable: the runner puts
    policy-rc.d there for the run), run in its container.  unreadable: paths known to read
    as EIO (damaged chunks); their packages are left out of dpkg --verify."""
    progress = progress or Silent()
    db = Database(MountRoot(root_dir))
    found = PackageFindings()
    argv = ["dpkg", "--verify"]
    if unreadable:
        skip = {o for p in unreadable for o in db.owners(p)}
        argv += [p for p in db.verifiable() if p not in skip]
        found.errors += [f"{p}: not verified (a file of it is on damaged chunks)"
                         for p in sorted(skip)]
    progress.step("dpkg --verify and dpkg --audit (the image's own dpkg)")
    (verify_out, verify_code), (audit_out, audit_code) = _both(root_dir, argv[2:])
    if verify_code != 0:
        found.errors.append(f"dpkg --verify failed (exit {verify_code})")
    for finding in parse_verify(verify_out, db):
        (found.drift if finding.conffile else found.damaged).append(finding)
    if audit_code != 0:
        found.errors.append(f"dpkg --audit failed (exit {audit_code})")
    found.bad_states = parse_audit(audit_out)
    return found


def _both(root_dir: str, packages: list[str]) -> list[tuple[bytes, int]]:
    """dpkg --verify [PACKAGES] and dpkg --audit in one container run (one start-up): each
    one's output and exit code, told apart by a separator no file name can guess."""
    sep = f"\x1eimagefs-{secrets.token_hex(8)}\x1e"
    script = ('dpkg --verify "$@"; printf "$0%d\\n" $?; dpkg --audit; printf "$0%d\\n" $?')
    out = run(root_dir, ["sh", "-c", script, sep, *packages], timeout=DPKG_TIMEOUT)
    parts = out.stdout.split(sep.encode())
    if out.returncode != 0 or len(parts) != 3:
        raise ServicingFailed(f"dpkg --verify and --audit could not run in {root_dir} "
                              f"(exit {out.returncode}): {_last_line(out.stderr)}",
                              out.stderr.decode(errors="replace"))
    verify_code, _nl, audit_out = parts[1].partition(b"\n")
    audit_code = parts[2].strip()
    return [(parts[0], int(verify_code or 1)),
            (audit_out, int(audit_code) if audit_code.isdigit() else 1)]


def _last_line(data: bytes) -> str:
    lines = data.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def parse_verify(stdout: bytes, db: Database | None = None) -> list[FileFinding]:
    """dpkg --verify's lines as findings, each with the packages owning its file (when db
    is given).  A line that is not dpkg's is not silently dropped: it is kept whole."""
    out = []
    for raw in stdout.decode("utf-8", "surrogateescape").split("\n"):
        m = _VERIFY_LINE.match(raw)
        if not m:
            if raw.strip():
                out.append(FileFinding(raw, "unreadable", "not a dpkg --verify line"))
            continue
        result, mark, path = m.group(1), m.group(2), m.group(3)
        detail = result.strip()
        if result.startswith("missing"):
            problem = "missing"
            # "/path (Permission denied)": the reason is dpkg's, unless the path is owned
            cut = re.match(r"(.*) \(([^()]*)\)\Z", path, re.S)
            if cut and db is not None and not db.owners(path) and db.owners(cut.group(1)):
                path, detail = cut.group(1), f"missing ({cut.group(2)})"
        elif result[1] == "M":
            problem = "not a regular file"
        elif result[2] == "5":
            problem = "content differs"
        else:
            problem = "unreadable"
        owners = db.owners(path) if db is not None else []
        out.append(FileFinding(path, problem, detail, owners, mark == "c"))
    return out


def parse_audit(stdout: bytes) -> list[BadState]:
    """dpkg --audit's report: paragraphs of an explanation (unindented lines) followed by
    one indented line per package; nothing at all when every package is well."""
    out: list[BadState] = []
    explanation: list[str] = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        if not line.strip():
            explanation = []
        elif line.startswith(" "):
            words = line.split()
            problem = " ".join(explanation)
            problem = re.split(r"(?<=\.)\s|:\Z", problem, maxsplit=1)[0].rstrip(":")
            out.append(BadState(words[0], problem or "reported by dpkg --audit"))
        else:
            explanation.append(line.strip())
    return out


class Database:
    """The image's dpkg database as health needs it, read through a Root: which packages
    own a path (info/*.list, diversions taken into account), a package's md5sums, its
    version and architecture (status and its journal)."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self._owners: dict[str, list[str]] | None = None
        self._md5: dict[str, dict[str, str]] = {}
        self._status: dict[tuple[str, str], Package] | None = None
        self.diverted_to: dict[str, tuple[str, str]] = {}  # to -> (from, by)
        self.diverted_from: dict[str, str] = {}  # from -> by
        lines = (root.read(f"{ADMINDIR}/diversions") or b"").decode(
            "utf-8", "surrogateescape").split("\n")
        for i in range(0, len(lines) - 2, 3):
            self.diverted_to[lines[i + 1]] = (lines[i], lines[i + 2])
            self.diverted_from[lines[i]] = lines[i + 2]

    def _info(self, suffix: str) -> list[str]:
        return sorted(n[:-len(suffix)] for n in self.root.names(INFO) or []
                      if n.endswith(suffix))

    def owners(self, path: str) -> list[str]:
        """The packages (info names: "coreutils", "libc6:amd64") whose file path is."""
        if self._owners is None:
            self._owners = {}
            for pkg in self._info(".list"):
                for line in (self.root.read(f"{INFO}/{pkg}.list") or b"").split(b"\n"):
                    if line:
                        name = line.decode("utf-8", "surrogateescape")
                        self._owners.setdefault(name, []).append(pkg)
        if path in self.diverted_to:
            orig, by = self.diverted_to[path]
            return [p for p in self._owners.get(orig, []) if p != by]
        owners = self._owners.get(path, [])
        by = self.diverted_from.get(path, "")
        return [by] if by in owners else list(owners)

    def package_path(self, path: str) -> str:
        """The path a package's lists name for the file at path (a diverted file's own)."""
        return self.diverted_to[path][0] if path in self.diverted_to else path

    def md5sums(self, pkg: str) -> dict[str, str]:
        """path (absolute) -> md5 of pkg's info/PKG.md5sums."""
        if pkg not in self._md5:
            table: dict[str, str] = {}
            text = self.root.read(f"{INFO}/{pkg}.md5sums") or b""
            for line in text.decode("utf-8", "surrogateescape").split("\n"):
                digest, sep, name = line.partition("  ")
                if sep and re.fullmatch(r"[0-9a-f]{32}", digest):
                    table["/" + name.lstrip("/")] = digest
            self._md5[pkg] = table
        return self._md5[pkg]

    def expected_md5(self, path: str, pkg: str) -> str | None:
        return self.md5sums(pkg).get(self.package_path(path))

    def _table(self) -> dict[tuple[str, str], Package]:
        """(name, architecture) -> the package, as status and its journal say."""
        if self._status is None:
            texts = [self.root.read(f"{ADMINDIR}/status") or b""]
            updates = self.root.names(f"{ADMINDIR}/updates") or []
            texts += [self.root.read(f"{ADMINDIR}/updates/{n}") or b""
                      for n in sorted((n for n in updates if n.isdigit()), key=int)]
            table: dict[tuple[str, str], Package] = {}
            for text in texts:
                try:
                    found = parse_status(text)
                except (ValueError, KeyError, IndexError) as e:
                    raise CorruptImage(self.root.label, f"its dpkg status: {e}") from None
                table.update(((p.name, p.architecture), p) for p in found)
            self._status = {k: p for k, p in table.items() if p.state != "not-installed"}
        return self._status

    def native(self) -> str:
        return next((a for (n, a) in self._table() if n == "dpkg"), "")

    def package(self, pkg: str) -> Package | None:
        """The installed package an info name ("coreutils", "libc6:amd64") stands for."""
        name, _sep, arch = pkg.partition(":")
        found = [p for (n, a), p in self._table().items() if n == name and arch in ("", a)]
        if len(found) > 1:
            found = [p for p in found if p.architecture in (self.native(), "all")]
        return found[0] if len(found) == 1 else None

    def verifiable(self) -> list[str]:
        """The packages dpkg --verify looks at when given none, named as dpkg names them."""
        native = self.native()
        return sorted(p.qualified_name(native) for p in self._table().values())


def pending_firstboot(root: Root) -> list[dict[str, str]]:
    """The first-boot items the next boot will run (servicing.firstboot)."""
    from .firstboot import pending

    return [{"id": i.id, "name": i.name, "state": i.state, "origin": i.origin}
            for i in pending(root)]


def deferred(found: PackageFindings, firstboot: list[dict[str, str]]) -> None:
    """Packages left unpacked (or their triggers pending) on purpose, their configuration
    queued for the first boot (package add --defer-configure), are pending, not damage."""
    if not any(i["name"] == DEFERRED_ITEM for i in firstboot):
        return
    found.deferred = [b for b in found.bad_states if b.problem.startswith(DEFERRABLE)]
    found.bad_states = [b for b in found.bad_states if b not in found.deferred]
