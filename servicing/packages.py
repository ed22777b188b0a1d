"""The Debian packages of an index, read from its own dpkg database without mounting it.

`imagefs package list` answers from /var/lib/dpkg/status in the image (and the journal
dpkg keeps beside it in updates/, which dpkg-query applies too), parsed with python-debian,
so it costs a few chunk reads instead of a mount.  The listing is what
`dpkg-query --admindir=MNT/var/lib/dpkg -W` prints on a mount of the same index: the same
packages, names qualified with their architecture in the same cases (tests keep the two
equal, with dpkg-query as the oracle).

The database is the image's, which is to say anybody's: its size is bounded, every stanza
without a name is skipped, and whatever else it holds is text that is only shown.

`PackageAdd` and `PackageRemove` are the servicing Changes of `package add` and `package
remove` (servicing.transaction runs them): their plan comes from servicing.resolver; they
apply it with the image's own dpkg in its container (servicing.runner), the .debs bound
read-only at /run/imagefs-debs, in one dpkg call (dpkg orders them), and check the result
with the image's own tools: `dpkg --audit` reports nothing new, and dpkg-query shows each
package in the state intended (ii; iU when configuration is deferred to the first boot;
rc or gone when removed).  Anything else fails the transaction with dpkg's output.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from debian.deb822 import Deb822

from imagefs.errors import CorruptImage, UsageError
from imagefs.image import Image

from .debs import Deb, file_contents, open_deb, repository, stage
from .reads import DPKG_READS
from .resolver import GONE, Action, Database, PackagePlan, pkg_of, plan_add, plan_remove
from .roots import IndexRoot, Root
from .runner import Completed, dpkg_options, run
from .transaction import Progress, Refused, ServicingFailed, Target

ADMINDIR = "/var/lib/dpkg"
STATUS = f"{ADMINDIR}/status"
MAX_DATABASE = 256 << 20  # bytes of status (and of each journal entry) read at most
# Parsed status files a process keeps (_stanzas), each at most KEPT_TEXT_MAX bytes long
# (a status file of 1 000 packages is ~2 MB)
STANZAS_KEPT = 8
KEPT_TEXT_MAX = 8 << 20
BIND = "/run/imagefs-debs"  # where the .debs are in the container
DPKG_TIMEOUT = 3600.0  # seconds a dpkg run (maintainer scripts included) may take
CONFIGURE_ITEM = "configure-packages"  # the first-boot item's name
CONFIGURE_SCRIPT = (b"#!/bin/sh\n"
                    b"# queued by imagefs package add --defer-configure\n"
                    b"set -e\n"
                    b"export DEBIAN_FRONTEND=noninteractive\n"
                    b"exec dpkg --force-confdef --force-confold --configure --pending\n")
# One container run for the checks: dpkg --audit, a separator, every package's state.
CHECK_SCRIPT = ("dpkg --audit; printf '\\036\\n'; exec dpkg-query -W -f "
                "'${Package}\\t${Architecture}\\t${Version}\\t${db:Status-Abbrev}\\n'")
# dpkg with its arguments ("$@"), its output and errors in one stream, then (if it
# succeeded) the check, in the same container run: one container start, not two.
RUN_THEN_CHECK = ('"$@" 2>&1; rc=$?; printf \'\\037%d\\n\' "$rc"; '
                  '[ "$rc" = 0 ] || exit "$rc"; ' + CHECK_SCRIPT)
STATES = ("not-installed", "config-files", "half-installed", "unpacked", "half-configured",
          "triggers-awaited", "triggers-pending", "installed")


@dataclass(frozen=True)
class Package:
    """One package as the dpkg database records it."""

    name: str
    version: str
    architecture: str
    multi_arch: str
    want: str  # install, hold, deinstall, purge, unknown
    state: str  # one of STATES

    def qualified_name(self, native: str) -> str:
        """dpkg's ${binary:Package}: the name, with :ARCH when another architecture's
        package of that name could be installed beside it (Multi-Arch: same) or when the
        package is of a foreign architecture."""
        if self.multi_arch == "same" or self.architecture not in (native, "all", ""):
            return f"{self.name}:{self.architecture}"
        return self.name

    def to_json(self, native: str) -> dict[str, str]:
        return {**asdict(self), "package": self.qualified_name(native)}


@dataclass
class PackageList:
    """The packages of one index, and the architecture its dpkg calls native."""

    image: str
    index: int
    name: str
    native: str
    packages: list[Package]

    def to_json(self) -> dict[str, object]:
        return {"image": self.image, "index": self.index, "name": self.name,
                "architecture": self.native,
                "packages": [p.to_json(self.native) for p in self.packages]}


def list_packages(image_path: str, index_spec: str) -> PackageList:
    """The packages dpkg-query would list on a mount of the index (every one not in state
    not-installed: a purged package's stanza is not listed), sorted as dpkg-query sorts
    them: by name, then architecture."""
    with Image.open(image_path) as img:
        view = img.view(index_spec)
        stanzas = read_database(IndexRoot(view))
    shown = [p for p in map(package_of, stanzas) if p.state != "not-installed"]
    shown.sort(key=lambda p: (p.name, p.architecture))
    native = next((p.architecture for p in shown if p.name == "dpkg"), "")
    return PackageList(view.image.path, view.number, view.entry.name, native, shown)


def read_database(root: Root) -> list[Mapping[str, str]]:
    """The stanzas (control fields) of root's dpkg database as dpkg reads it: the status
    file, then each journal entry (updates/NNNN, in order) replacing the stanza of the
    same name and architecture."""
    status = root.read(STATUS, MAX_DATABASE)
    if status is None:
        raise UsageError(f"{root.label} has no dpkg database ({STATUS}): not a Debian root "
                         "filesystem")
    names = root.names(f"{ADMINDIR}/updates") or []
    journal = [f"{ADMINDIR}/updates/{n}" for n in sorted((n for n in names if n.isdigit()),
                                                         key=int)]
    table: dict[tuple[str, str], Mapping[str, str]] = {}
    for path in (STATUS, *journal):
        text = status if path == STATUS else root.read(path, MAX_DATABASE)
        try:
            for fields in _stanzas(text or b""):
                table[(fields["Package"], fields.get("Architecture", ""))] = fields
        except (ValueError, KeyError, IndexError) as e:
            where = getattr(getattr(root, "view", None), "image", None)
            raise CorruptImage(where.path if where else root.label,
                               f"{root.label}: {path} is not a dpkg database ({e})") from None
    return list(table.values())


def _stanzas(text: bytes) -> tuple[Mapping[str, str], ...]:
    """The stanzas of a dpkg status file (or journal entry) that name a package, read
    only.  Kept by their exact bytes: a daemon servicing copies of one golden image parses
    its ~150-stanza status file once, not in every plan (~15 ms of a package add)."""
    return _kept_stanzas(text) if len(text) <= KEPT_TEXT_MAX else _parsed(text)


@functools.lru_cache(maxsize=STANZAS_KEPT)
def _kept_stanzas(text: bytes) -> tuple[Mapping[str, str], ...]:
    return _parsed(text)


def _parsed(text: bytes) -> tuple[Mapping[str, str], ...]:
    return tuple(MappingProxyType(fields) for para in Deb822.iter_paragraphs(
        io.StringIO(text.decode("utf-8", "replace")), use_apt_pkg=False)
        for fields in [{k: v.strip() for k, v in para.items()}] if fields.get("Package"))


def database(root: Root) -> Database:
    """root's dpkg database for planning (Refused when it has none, or no dpkg)."""
    pkgs = [pkg_of(fields, package_of(fields).state) for fields in read_database(root)]
    native = next((p.architecture for p in pkgs if p.name == "dpkg" and p.state not in GONE),
                  "")
    if not native:
        raise Refused(f"{root.label}: dpkg is not installed in it: no package can be "
                      "serviced")
    return Database(root.label, native, pkgs)


def package_of(fields: Mapping[str, str]) -> Package:
    """A stanza of the dpkg database as a Package."""
    words = fields.get("Status", "").split()
    want, state = (words[0], words[2]) if len(words) == 3 else ("unknown", "not-installed")
    return Package(fields.get("Package", ""), fields.get("Version", ""),
                   fields.get("Architecture", ""), fields.get("Multi-Arch", ""), want,
                   state if state in STATES else "not-installed")


def parse_status(text: bytes) -> list[Package]:
    """The stanzas of a dpkg status file (or journal entry) as Packages.  Bytes that are not
    UTF-8 are shown replaced (names and versions are ASCII in any real database)."""
    out = []
    lines = io.StringIO(text.decode("utf-8", "replace"))
    for para in Deb822.iter_paragraphs(lines, use_apt_pkg=False):
        fields = {k: v.strip() for k, v in para.items()}
        if fields.get("Package"):
            out.append(package_of(fields))
    return out


class PackageAdd:
    """`package add`: install .debs (and what they need from a repository folder)."""

    verb = "package add"
    reads = DPKG_READS

    def __init__(self, debs: Sequence[str], repository: str | None = None,
                 defer_configure: bool = False) -> None:
        if not debs:
            raise UsageError("no .deb to add")
        self.debs, self.repository = list(debs), repository
        self.defer = defer_configure
        self._given: list[Deb] | None = None
        self._repo: tuple[list[Deb], list[str]] = ([], [])
        self._checked: dict[str, Deb] = {}

    def arguments(self) -> dict[str, Any]:
        return {"debs": [os.path.abspath(d) for d in self.debs],
                "repository": self.repository and os.path.abspath(self.repository),
                "defer_configure": self.defer}

    def plan(self, root: Root) -> PackagePlan:
        if self._given is None:  # once for every index serviced
            self._given = [open_deb(d) for d in self.debs]
            if self.repository is not None:
                self._repo = repository(self.repository)
        if self.defer:
            from .firstboot import has_systemd

            if not has_systemd(root):
                raise Refused(f"{root.label}: --defer-configure needs systemd in the image "
                              "(it runs the first-boot queue), and it has none")
        plan = plan_add(database(root), self._given, self._repo[0], self.defer)
        for action in plan.actions:  # a repository's package is checked once chosen
            deb = action.pkg.deb
            if deb is not None and deb not in self._given:
                action.pkg.deb = self._check(deb)
        plan.notes += [f"skipped in the repository: {n}" for n in self._repo[1]]
        return plan

    def _check(self, deb: Deb) -> Deb:
        if deb.path not in self._checked:
            checked = open_deb(deb.path)
            if checked.sha256 != deb.sha256:
                raise Refused(f"{deb.given}: changed while it was being read")
            self._checked[deb.path] = checked
        return self._checked[deb.path]

    def expected_content(self, plans: list[Any]) -> Iterator[bytes]:
        """The files of every .deb the plans install (transaction.KnowsContent)."""
        from imagefs.format.ahead import BUDGET

        most, done = BUDGET, set()
        for plan in plans:
            for action in plan.actions:
                deb = action.pkg.deb
                if deb is None or deb.path in done:
                    continue
                done.add(deb.path)
                for data in file_contents(deb, most):
                    most -= len(data)
                    yield data

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, PackagePlan)
        debs = [a.pkg.deb for a in plan.actions if a.pkg.deb is not None]
        mode = "--unpack" if self.defer else "--install"
        with tempfile.TemporaryDirectory(prefix="imagefs-debs-", dir=target.scratch) as tmp:
            names = stage(debs, tmp)
            progress.step(f"{'unpacking' if self.defer else 'installing'} {len(names)} "
                          "package(s) with the image's dpkg")
            checked = _dpkg(target.root, [mode, *(f"{BIND}/{n}" for n in names)],
                            binds=[(tmp, BIND)])
        progress.step("checking with dpkg --audit and dpkg-query")
        _check(checked, plan, {a.pkg.key: {"iU " if self.defer else "ii "}
                               for a in plan.actions})
        item = _queue(target.root) if self.defer else None
        return {"added": [_done(a, "unpacked" if self.defer else "installed")
                          for a in plan.actions], "first_boot_item": item}


class PackageRemove:
    """`package remove`: remove (or purge) packages, refusing what would break others."""

    verb = "package remove"
    reads = DPKG_READS

    def __init__(self, names: Sequence[str], purge: bool = False,
                 with_dependents: bool = False) -> None:
        if not names:
            raise UsageError("no package to remove")
        self.names, self.purge, self.with_dependents = list(names), purge, with_dependents

    def arguments(self) -> dict[str, Any]:
        return {"names": self.names, "purge": self.purge,
                "with_dependents": self.with_dependents}

    def plan(self, root: Root) -> PackagePlan:
        return plan_remove(database(root), self.names, self.purge, self.with_dependents)

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, PackagePlan)
        pkgs = [a.pkg for a in plan.actions]
        progress.step(f"{'purging' if self.purge else 'removing'} {len(pkgs)} package(s) "
                      "with the image's dpkg")
        names = [Package(p.name, p.version, p.architecture, p.multi_arch, "", "")
                 .qualified_name(plan.native) for p in pkgs]
        checked = _dpkg(target.root, ["--purge" if self.purge else "--remove", "--", *names])
        progress.step("checking with dpkg --audit and dpkg-query")
        _check(checked, plan, {p.key: {"", "pn "} if self.purge else {"", "rc "}
                               for p in pkgs})
        return {"removed": [_done(a, "purged" if self.purge else "removed")
                            for a in plan.actions]}


def _done(action: Action, state: str) -> dict[str, Any]:
    p = action.pkg
    return {"package": p.name, "version": p.version, "architecture": p.architecture,
            "previous": action.previous, "state": state}


def _dpkg(root: str, args: list[str], binds: Sequence[tuple[str, str]] = ()) -> Completed:
    """Run the image's dpkg with args (its output and errors in one stream, in order), then
    the check (CHECK_SCRIPT) in the same container; ServicingFailed with dpkg's output when
    it fails, else what the check printed (for _check)."""
    # --force-unsafe-io: dpkg's own fsyncs buy nothing in a session, whose changes become
    # durable only by the commit (a crash before it discards them whole).
    argv = ["dpkg", *dpkg_options(), "--force-unsafe-io", *args]
    out = run(root, ["sh", "-c", RUN_THEN_CHECK, "sh", *argv], binds=binds,
              timeout=DPKG_TIMEOUT)
    dpkg_out, sep, checked = out.stdout.partition(b"\x1f")
    code_text, _nl, checked = checked.partition(b"\n")
    code = int(code_text) if sep and code_text.isdigit() else out.returncode or 1
    if code != 0:
        text = (dpkg_out + out.stderr).decode(errors="replace")
        lines = text.splitlines()
        at = next((i for i, ln in enumerate(lines) if ln.startswith("dpkg: error")), None)
        why = (" ".join(ln.strip() for ln in lines[at:at + 2]).removeprefix("dpkg: ")
               if at is not None else f"exit code {code}")
        raise ServicingFailed(f"dpkg {args[0]} failed: {why}", text)
    return Completed(out.argv, out.returncode, checked, out.stderr)


def _check(out: Completed, plan: PackagePlan, want: dict[tuple[str, str], set[str]]) -> None:
    """In what CHECK_SCRIPT printed: dpkg --audit reports nothing but what was reported
    before (and, with deferred configuration, the packages left to configure); each
    package is in a wanted state (db:Status-Abbrev; "" for not listed)."""
    audit, _sep, listing = out.stdout.partition(b"\x1e\n")
    states: dict[tuple[str, str], tuple[str, str]] = {}
    for line in listing.decode(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            states[(parts[0], parts[1])] = (parts[2], parts[3])
    text = audit.decode(errors="replace")
    reported = {ln.split()[0].split(":")[0] for ln in text.splitlines()
                if ln.startswith(" ") and ln.strip()}
    waiting = {k[0] for k, (_v, abbrev) in states.items() if abbrev[1:2] in ("U", "t", "W")}
    allowed = set(plan.unclean) | (waiting if plan.defer else set())
    if text.strip() and (not reported or reported - allowed):
        raise ServicingFailed("dpkg --audit reports problems after the change", text)
    wrong = [f"{name} is {states.get((name, arch), ('', 'gone'))[1].strip() or '?'}"
             for (name, arch), ok in want.items()
             if states.get((name, arch), ("", ""))[1] not in ok]
    if out.returncode != 0 or wrong:
        raise ServicingFailed("dpkg left packages in an unexpected state: "
                              + (", ".join(wrong) or f"dpkg-query exited {out.returncode}"),
                              (out.stdout + out.stderr).decode(errors="replace"))


def _queue(root: str) -> str:
    """Queue `dpkg --configure --pending` for the first boot (servicing.firstboot), unless
    an earlier deferred add queued it and it has not run yet: it configures these too."""
    from .firstboot import enqueue, pending
    from .roots import MountRoot

    for item in pending(MountRoot(root)):
        if item.name == CONFIGURE_ITEM and item.state == "queued":
            return item.id
    return enqueue(root, CONFIGURE_ITEM, CONFIGURE_SCRIPT,
                   origin="imagefs package add --defer-configure")
