"""The plan of `package add` and `package remove`: which packages change, in which versions,
or why not, decided before anything changes.

From three sources: the image's dpkg database (a Database: servicing.packages.database
reads it through a Root), the .debs given, and a repository folder of .debs indexed on
the fly.  The relations are dpkg's: Pre-Depends and Depends
with alternatives, version relations and Provides (versioned Provides satisfy versioned
dependencies, unversioned ones only unversioned), Conflicts and Breaks both ways (the new
packages' against the image's and the image's against the new), and the image's native
architecture or `all`.  Relation fields are parsed with python-debian's PkgRelation and
versions compared with its implementation of dpkg's algorithm.

What dpkg could do only with --force or --auto-deconfigure is refused, naming every
problem at once: an unmet dependency, a conflict, a wrong architecture, a downgrade, an
upgrade that breaks an installed package; for removal, an essential package (or one an
essential package needs) and packages that depend on those removed (unless they are to be
removed too).  apt's choices are made the simple way: the first alternative that a
repository package satisfies, its highest version.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cmp_to_key
from typing import TYPE_CHECKING, Any

from debian.deb822 import PkgRelation
from debian.debian_support import version_compare

from imagefs.errors import one_line

from .debs import NAME, Deb
from .transaction import Refused

CONFIGURED = frozenset({"installed", "triggers-pending", "triggers-awaited"})
UNPACKED = frozenset({"unpacked", "half-configured"})
GONE = frozenset({"not-installed", "config-files"})
if TYPE_CHECKING:
    Rel = PkgRelation.ParsedRelation  # one relation: name, archqual, version (op, version)
else:
    Rel = dict
RELATION_NAME = NAME.pattern.replace("+.-]+", "+._-]*")  # dpkg also allows '_' and 1 char


class _Unparsable(logging.Filter):
    """python-debian logs each relation it cannot parse (and returns it raw): we judge
    those ourselves (a given .deb's is refused), so the log stays quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("cannot parse package relationship")


logging.getLogger("debian.deb822").addFilter(_Unparsable())


@dataclass
class Pkg:
    """A package as planning sees it: from the image's database (state set) or a .deb."""

    name: str
    version: str
    architecture: str
    multi_arch: str = ""
    essential: bool = False
    installed_size: int = 0  # KiB
    state: str = ""  # dpkg's, for an installed one
    depends: list[list[Rel]] = field(default_factory=list)  # Pre-Depends, then Depends
    pre_depends: list[list[Rel]] = field(default_factory=list)  # also in depends
    conflicts: list[Rel] = field(default_factory=list)
    breaks: list[Rel] = field(default_factory=list)
    provides: list[Rel] = field(default_factory=list)
    deb: Deb | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.architecture)

    def label(self) -> str:
        return f"{one_line(self.name)} {one_line(self.version)}"


def pkg_of(fields: Mapping[str, str], state: str = "", deb: Deb | None = None) -> Pkg:
    """A Pkg from control fields; a .deb's malformed relation field is refused."""
    rel = {f: _relations(fields, f, deb) for f in
           ("Pre-Depends", "Depends", "Conflicts", "Breaks", "Provides")}
    size = fields.get("Installed-Size", "").strip()
    return Pkg(fields.get("Package", "").strip(), fields.get("Version", "").strip(),
               fields.get("Architecture", "").strip(), fields.get("Multi-Arch", "").strip(),
               "yes" in (fields.get("Essential", "").strip(), fields.get("Protected", "").strip()),
               int(size) if size.isdigit() else 0, state,
               rel["Pre-Depends"] + rel["Depends"], rel["Pre-Depends"],
               [a for g in rel["Conflicts"] for a in g], [a for g in rel["Breaks"] for a in g],
               [a for g in rel["Provides"] for a in g], deb)


def _relations(fields: Mapping[str, str], name: str, deb: Deb | None) -> list[list[Rel]]:
    text = " ".join(fields.get(name, "").split())
    if not text:
        return []
    groups = PkgRelation.parse_relations(text)
    ok = [[a for a in g if re.fullmatch(RELATION_NAME, a["name"])] for g in groups]
    if deb is not None and ok != groups:
        raise Refused(f"{one_line(deb.given)}: its {name} field cannot be parsed "
                      f"({one_line(text[:80])})")
    return [g for g in ok if g]


def relation_text(group: list[Rel]) -> str:
    return one_line(PkgRelation.str([group]))  # type: ignore[list-item]


def version_ok(version: str, wanted: tuple[str, str] | None) -> bool:
    """version satisfies the relation (op, version); a malformed version satisfies none."""
    if wanted is None:
        return True
    op, other = wanted
    try:
        c = version_compare(version, other)
    except ValueError:
        return False
    return {"<<": c < 0, "<=": c <= 0, "<": c <= 0, "=": c == 0, ">=": c >= 0,
            ">>": c > 0, ">": c >= 0}.get(op, False)


class World:
    """A set of packages (one per name and architecture) and what they provide."""

    def __init__(self, native: str, pkgs: Iterable[Pkg] = ()) -> None:
        self.native = native
        self.pkgs: dict[tuple[str, str], Pkg] = {p.key: p for p in pkgs}
        self._index: dict[str, list[tuple[Pkg, tuple[str, str] | None]]] | None = None

    def add(self, pkg: Pkg) -> None:
        self.pkgs = {k: p for k, p in self.pkgs.items() if p.name != pkg.name
                     or p.architecture not in (pkg.architecture, "all")}
        self.pkgs[pkg.key] = pkg
        self._index = None

    def without(self, keys: Iterable[tuple[str, str]]) -> World:
        gone = set(keys)
        return World(self.native, (p for k, p in self.pkgs.items() if k not in gone))

    def _candidates(self, name: str) -> list[tuple[Pkg, tuple[str, str] | None]]:
        """(package, version) pairs answering to name: the package itself (its version),
        and providers (the provided version, or None)."""
        if self._index is None:
            self._index = {}
            for p in self.pkgs.values():
                self._index.setdefault(p.name, []).append((p, ("=", p.version)))
                for prov in p.provides:
                    self._index.setdefault(prov["name"], []).append((p, prov["version"]))
        return self._index.get(name, [])

    def matching(self, rel: Rel, arch: str) -> list[Pkg]:
        """The packages that satisfy rel for a package of architecture arch."""
        out = []
        for pkg, have in self._candidates(rel["name"]):
            if not self._arch_ok(pkg, rel.get("archqual"), arch):
                continue
            if rel["version"] is None or (have is not None and version_ok(have[1],
                                                                            rel["version"])):
                out.append(pkg)
        return out

    def _arch_ok(self, pkg: Pkg, qual: str | None, arch: str) -> bool:
        own = self.native if arch in ("all", "") else arch
        if qual is None:
            return pkg.architecture in (own, "all") or pkg.multi_arch == "foreign"
        if qual == "any":
            return True
        if qual == "native":
            return pkg.architecture in (self.native, "all")
        return pkg.architecture == qual

    def satisfies(self, group: list[Rel], arch: str) -> bool:
        return any(self.matching(rel, arch) for rel in group)


@dataclass
class Database:
    """The image's packages: every stanza of its dpkg database, and its native arch."""

    label: str
    native: str
    pkgs: list[Pkg]

    def present(self) -> list[Pkg]:
        return [p for p in self.pkgs if p.state not in GONE and p.state]

    def world(self, unpacked_ok: bool = False) -> World:
        """What satisfies dependencies: configured packages (and unpacked ones when
        configuration is deferred anyway)."""
        ok = CONFIGURED | (UNPACKED if unpacked_ok else frozenset())
        return World(self.native, (p for p in self.pkgs if p.state in ok))

    def unclean(self) -> list[str]:
        """Packages dpkg --audit would already report (not configured, or half done)."""
        return sorted({p.name for p in self.present() if p.state != "installed"})


@dataclass
class Action:
    """One package to install, upgrade, reinstall, remove or purge."""

    kind: str
    pkg: Pkg
    previous: str | None = None  # the version it replaces (upgrade), or what it needs
    why: str = ""  # where it comes from (a file, the repository) or why it goes

    def line(self) -> str:
        p = self.pkg
        what = (f"{self.kind} {one_line(p.name)} {one_line(self.previous or '')} -> "
                f"{one_line(p.version)}" if self.kind == "upgrade" else
                f"{self.kind} {p.label()}")
        why = f" {one_line(self.why)}" if self.why else ""
        return f"{what} ({one_line(p.architecture)}, {p.installed_size} KiB){why}"

    def to_json(self) -> dict[str, Any]:
        p = self.pkg
        return {"action": self.kind, "package": p.name, "version": p.version,
                "architecture": p.architecture, "installed_size_kib": p.installed_size,
                "previous": self.previous, "why": self.why,
                "file": p.deb.path if p.deb else None}


@dataclass
class PackagePlan:
    """What package add or remove will do to one index."""

    verb: str  # "add" or "remove"
    actions: list[Action] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # nothing to do for these
    notes: list[str] = field(default_factory=list)
    defer: bool = False
    unclean: list[str] = field(default_factory=list)  # already in a bad state: allowed
    native: str = ""

    def empty(self) -> bool:
        return not self.actions

    def lines(self) -> list[str]:
        out = [a.line() for a in self.actions] + self.already + self.notes
        if self.actions:
            kib = sum(a.pkg.installed_size for a in self.actions)
            n = len(self.actions)
            out.append(f"{n} package{'s' if n > 1 else ''}, {kib} KiB installed size "
                       + ("freed" if self.verb == "remove" else "in all"))
        if self.defer and self.actions:
            out.append("configuration deferred to the first boot (dpkg --configure "
                       "--pending)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"verb": self.verb, "actions": [a.to_json() for a in self.actions],
                "already": self.already, "notes": self.notes,
                "defer_configure": self.defer}


def refuse(problems: list[str]) -> None:
    """Refused, naming every problem (each once), if there is any."""
    if problems:
        raise Refused("; ".join(dict.fromkeys(problems)))


def plan_add(db: Database, given: list[Deb], repo: list[Deb], defer: bool) -> PackagePlan:
    """Install given (and what they need from repo) in the image of db; Refused naming
    every problem."""
    plan = PackagePlan("add", defer=defer, unclean=db.unclean(), native=db.native)
    problems: list[str] = []
    world = db.world(unpacked_ok=defer)
    chosen: dict[str, Action] = {}
    candidates = _repository_pkgs(repo)
    for deb in given:
        pkg, known = pkg_of(deb.fields, deb=deb), len(problems)
        action = _admit(db, pkg, f"from {deb.given}", problems)
        if action is None:
            if len(problems) == known:
                plan.already.append(f"{pkg.label()} is already installed")
            continue
        other = chosen.get(pkg.name)
        if other is not None and other.pkg.version != pkg.version:
            problems.append(f"two versions of {one_line(pkg.name)} are given "
                            f"({one_line(other.pkg.version)} and {one_line(pkg.version)})")
        chosen[pkg.name] = action
        world.add(pkg)
    pending = list(chosen.values())
    while pending:
        pkg = pending.pop(0).pkg
        if defer:
            problems += _pre_depends(db, pkg)
        for group in pkg.depends:
            if world.satisfies(group, pkg.architecture):
                continue
            pick = _from_repository(db, group, pkg.architecture, candidates)
            if pick is None:
                problems.append(_unmet(db, pkg, group, bool(repo)))
                continue
            action = _admit(db, pick, f"from the repository ({pick.deb.given})"
                            if pick.deb else "", problems)
            if action is not None and pick.name not in chosen:
                chosen[pick.name] = action
                world.add(pick)
                pending.append(action)
    new = [a.pkg for a in chosen.values()]
    problems += _conflicts(new, db) + _broken_by(db, world, new)
    refuse(problems)
    plan.actions = list(chosen.values())
    return plan


def _pre_depends(db: Database, pkg: Pkg) -> list[str]:
    """With --defer-configure nothing is configured now, but dpkg unpacks a package only
    once its Pre-Depends are configured: they must be so in the image already."""
    configured = db.world()
    return [f"{pkg.label()} needs {relation_text(group)} configured before it is unpacked "
            "(Pre-Depends), which --defer-configure cannot do: add that without it first"
            for group in pkg.pre_depends if not configured.satisfies(group, pkg.architecture)]


def _admit(db: Database, pkg: Pkg, source: str, problems: list[str]) -> Action | None:
    """The action installing pkg (None when it is installed already), or a problem."""
    if pkg.architecture not in (db.native, "all"):
        problems.append(f"{pkg.label()} is for {one_line(pkg.architecture)}, but the image "
                        f"runs {db.native} (only {db.native} and all packages are installed)")
        return None
    old = next((p for p in db.present() if p.name == pkg.name
                and p.architecture in (pkg.architecture, "all", db.native)), None)
    if old is None:
        return Action("install", pkg, None, source)
    try:
        c = version_compare(pkg.version, old.version)
    except ValueError:
        c = 1
    if c < 0:
        problems.append(f"{pkg.label()} is older than the installed {old.label()}: "
                        "imagefs does not downgrade")
        return None
    if c == 0 and old.state in CONFIGURED:
        return None
    return Action("upgrade" if c > 0 else "reinstall", pkg, old.version if c > 0 else None,
                  source)


def _from_repository(db: Database, group: list[Rel], arch: str, repo: list[Pkg]
                     ) -> Pkg | None:
    """The repository's package for a dependency: the first alternative that one
    satisfies, its highest version (no downgrade of an installed package)."""
    installed = {p.name: p.version for p in db.present()}
    for rel in group:
        found = [pkg for pkg in repo
                 if pkg.architecture in (db.native, "all")
                 and (pkg.name not in installed
                      or version_ok(pkg.version, (">>", installed[pkg.name])))
                 and World(db.native, [pkg]).matching(rel, arch)]
        if found:
            return max(found, key=cmp_to_key(_by_version))
    return None


def _by_version(a: Pkg, b: Pkg) -> int:
    return version_compare(a.version, b.version)


def _repository_pkgs(repo: list[Deb]) -> list[Pkg]:
    """The repository's packages; one whose relations cannot be parsed is left out."""
    out = []
    for deb in repo:
        try:
            out.append(pkg_of(deb.fields, deb=deb))
        except Refused:
            continue
    return out


def _unmet(db: Database, pkg: Pkg, group: list[Rel], with_repo: bool) -> str:
    sources = ("neither the image, the given packages nor the repository provide"
               if with_repo else "neither the image nor the given packages provide")
    have = [p.label() for rel in group for p in db.present() if p.name == rel["name"]]
    has = f" (the image has {', '.join(have)})" if have else ""
    return f"{pkg.label()} needs {relation_text(group)}, which {sources}{has}"


def _conflicts(new: list[Pkg], db: Database) -> list[str]:
    """Conflicts and Breaks between the new packages and everything else, both ways (an
    installed package counts whatever its state: its files are there)."""
    names = {p.name for p in new}
    present = [p for p in db.present() if p.name not in names]
    everything, fresh = World(db.native, present + new), World(db.native, new)
    problems = []
    for pkg, others, who in ([(p, everything, "") for p in new]
                             + [(p, fresh, "the installed ") for p in present]):
        for kind, rels in (("conflicts with", pkg.conflicts), ("breaks", pkg.breaks)):
            for rel in rels:
                for other in others.matching(rel, pkg.architecture):
                    if other.name != pkg.name:
                        where = ("" if who else
                                 " (given)" if other.name in names else " (installed)")
                        problems.append(f"{who}{pkg.label()} {kind} {other.label()}{where}")
    return problems


def _broken_by(db: Database, world: World, new: list[Pkg]) -> list[str]:
    """Installed packages whose dependencies an upgrade would no longer satisfy."""
    upgraded = {p.name for p in new} & {p.name for p in db.present()}
    before = db.world()
    return [f"the new packages would break the installed {old.label()}, which needs "
            f"{relation_text(group)}"
            for old in (before.pkgs.values() if upgraded else ()) if old.name not in upgraded
            for group in old.depends
            if before.satisfies(group, old.architecture)
            and not world.satisfies(group, old.architecture)]


def plan_remove(db: Database, names: list[str], purge: bool, with_dependents: bool
                ) -> PackagePlan:
    """Remove (purge) the packages named, and with with_dependents those that depend on
    them; Refused naming every problem."""
    plan = PackagePlan("remove", unclean=db.unclean(), native=db.native)
    kind = "purge" if purge else "remove"
    problems: list[str] = []
    going: dict[tuple[str, str], Action] = {}
    for name in names:
        found = [p for p in db.pkgs if name in (p.name, f"{p.name}:{p.architecture}")
                 and p.state != "not-installed"]
        if not found:
            problems.append(f"{one_line(name)} is not installed (the image has no package "
                            "of that name)")
        for pkg in found:
            if pkg.state == "config-files" and not purge:
                plan.already.append(f"{pkg.label()} is already removed (its configuration "
                                    "files stay; --purge removes them)")
            elif pkg.essential:
                problems.append(f"{pkg.label()} is essential to the image (Essential: yes) "
                                "and is never removed")
            else:
                going[pkg.key] = Action(kind, pkg, None, "(configuration files)"
                                        if pkg.state == "config-files" else "")
    refuse(problems)
    _dependents(db, going, kind, with_dependents, problems)
    refuse(problems)
    plan.actions = list(going.values())
    return plan


def _dependents(db: Database, going: dict[tuple[str, str], Action], kind: str,
                with_dependents: bool, problems: list[str]) -> None:
    """Add to going the installed packages that need those going (with_dependents), or
    name them as problems; an essential one is always a problem."""
    before = World(db.native, db.present())
    while True:
        after = before.without(going)
        broken: dict[tuple[str, str], tuple[Pkg, list[Rel]]] = {}
        for pkg in after.pkgs.values():
            for group in pkg.depends:
                if before.satisfies(group, pkg.architecture) and not after.satisfies(
                        group, pkg.architecture):
                    broken[pkg.key] = (pkg, group)
                    break
        if not broken:
            return
        removed = ", ".join(one_line(a.pkg.name) for a in going.values())
        for pkg, group in broken.values():
            if pkg.essential:
                problems.append(f"removing {removed} would break the essential package "
                                f"{pkg.label()}, which needs {relation_text(group)}")
        if problems:
            return
        if not with_dependents:
            them = ", ".join(f"{p.label()} (needs {relation_text(g)})"
                             for p, g in broken.values())
            problems.append(f"removing {removed} would break {them}; add --with-dependents "
                            "to remove them too")
            return
        for pkg, group in broken.values():
            going[pkg.key] = Action(kind, pkg, None, f"(it needs {relation_text(group)})")
