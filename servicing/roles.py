"""Roles: a TOML file naming the units to enable, disable, mask and unmask in an index and
the packages to add and remove, applied as one servicing transaction (`imagefs feature
apply IMAGE INDEX ROLE.toml`).

    description = "web front end"
    [packages]
    add = ["debs/nginx-light_1.22.1-9_amd64.deb"]  # paths relative to the role file
    repository = "debs"                           # where their dependencies come from
    remove = ["tree"]
    purge = false
    [units]
    enable = ["nginx.service"]
    disable = ["apt-daily.timer", "apt-daily-upgrade.timer"]
    mask = ["e2scrub_reap.service"]
    unmask = []

The packages go first, through servicing.packages' own Changes (PackageRemove, then
PackageAdd: planned against the index, applied with the image's dpkg), then the units
(servicing.features), replanned on the result when packages changed, so that a unit a
package brings can be named (its plan says so).  Everything is in one session: committed
together or not at all.

A role file is anybody's input: it is read bounded (MAX_ROLE bytes), parsed with tomllib,
and refused with one line (Refused, exit 2) for anything but the keys above with values
of their types, lists over MAX_ITEMS, unit names that are not unit names (a path, a
control character), package names that are not Debian names, or a unit named twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import NotFound, UsageError, one_line

from .debs import Deb
from .features import ORDER, VERBS, UnitPlan, apply_units, plan_units, unit_names
from .packages import PackageAdd, PackageRemove
from .resolver import PackagePlan
from .roots import MountRoot, Root
from .transaction import Progress, Refused, Target

MAX_ROLE = 1 << 20  # bytes of a role file
MAX_ITEMS = 256  # entries of one list
MAX_TEXT = 4096  # characters of a path or the description
KEYS = {"description": str, "packages": dict, "units": dict}
PACKAGE_KEYS = {"add": list, "repository": str, "remove": list, "purge": bool}
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(:[a-z0-9][a-z0-9-]*)?\Z")  # name or name:arch
UNIT_DIRS = (b"lib/systemd/system/", b"usr/lib/systemd/system/", b"etc/systemd/system/")


@dataclass
class Role:
    """A role file, checked."""

    path: str
    sha256: str
    description: str = ""
    add: list[str] = field(default_factory=list)  # absolute paths of .debs
    repository: str | None = None
    remove: list[str] = field(default_factory=list)
    purge: bool = False
    units: dict[str, list[str]] = field(default_factory=dict)  # verb: units

    def requests(self) -> list[tuple[str, str]]:
        """(verb, unit) in the order they are applied."""
        return [(verb, u) for verb in ORDER for u in self.units.get(verb, [])]

    def to_json(self) -> dict[str, Any]:
        return {"role": self.path, "sha256": self.sha256, "description": self.description,
                "packages": {"add": self.add, "repository": self.repository,
                             "remove": self.remove, "purge": self.purge},
                "units": self.units}


def read_role(path: str) -> Role:
    """The role file at path, checked (see the module); Refused with one line otherwise."""
    data = _read(path)
    shown = one_line(path)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(f"{shown}: not a role file: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise Refused(f"{shown}: not a valid TOML file: {one_line(str(e))}") from None
    except RecursionError:
        raise Refused(f"{shown}: not a role file: nested too deeply") from None
    _check_keys(shown, "", doc, KEYS)
    base = os.path.dirname(os.path.abspath(path))
    role = Role(os.path.abspath(path), hashlib.sha256(data).hexdigest(),
                description=_text(shown, "description", doc.get("description", "")))
    packages = doc.get("packages", {})
    _check_keys(shown, "packages.", packages, PACKAGE_KEYS)
    role.add = [os.path.join(base, p) for p in _paths(shown, "packages.add",
                                                      packages.get("add", []))]
    if "repository" in packages:
        role.repository = os.path.join(base, _text(shown, "packages.repository",
                                                   packages["repository"]))
    role.remove = _packages(shown, packages.get("remove", []))
    role.purge = packages.get("purge", False)
    role.units = _units(shown, doc.get("units", {}))
    if not (role.add or role.remove or role.units):
        raise Refused(f"{shown}: the role names nothing to do (no packages to add or "
                      "remove, no units to change)")
    return role


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such role file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the role file: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(f"{one_line(path)}: not a role file (not a regular file)")
        data = os.read(fd, MAX_ROLE + 1)
        while len(data) <= MAX_ROLE and (more := os.read(fd, MAX_ROLE + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_ROLE:
        raise Refused(f"{one_line(path)}: not a role file: over {MAX_ROLE >> 10} KiB")
    return data


def _check_keys(shown: str, prefix: str, table: Any, known: Mapping[str, type]) -> None:
    if not isinstance(table, dict):
        raise Refused(f"{shown}: `{prefix.rstrip('.')}` must be a table")
    for key, value in table.items():
        if key not in known:
            raise Refused(f"{shown}: unknown key `{one_line(prefix + key)[:100]}` (known: "
                          f"{', '.join(prefix + k for k in known)})")
        if not isinstance(value, known[key]):
            raise Refused(f"{shown}: `{prefix}{key}` must be "
                          f"{_kind(known[key])}, not {_kind(type(value))}")


def _kind(t: type) -> str:
    return {str: "a string", list: "a list", dict: "a table", bool: "true or false",
            int: "a number", float: "a number"}.get(t, "a date or time")


def _text(shown: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(f"{shown}: `{key}` must be a string")
    if len(value) > MAX_TEXT or "\0" in value or (key != "description" and
                                                  one_line(value) != value):
        raise Refused(f"{shown}: `{key}` is over {MAX_TEXT} characters or holds control "
                      "characters")
    return value


def _strings(shown: str, key: str, value: Any) -> list[str]:
    if len(value) > MAX_ITEMS:
        raise Refused(f"{shown}: `{key}` lists {len(value)} entries, more than "
                      f"{MAX_ITEMS}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise Refused(f"{shown}: `{key}` must list strings, not {_kind(type(bad[0]))}")
    return list(value)


def _paths(shown: str, key: str, value: Any) -> list[str]:
    return [_text(shown, key, v) for v in _strings(shown, key, value)]


def _packages(shown: str, value: Any) -> list[str]:
    names = _strings(shown, "packages.remove", value)
    bad = [n for n in names if not PACKAGE.match(n)]
    if bad:
        raise Refused(f"{shown}: `packages.remove`: {one_line(repr(bad[0][:100]))} is not a "
                      "Debian package name")
    return list(dict.fromkeys(names))


def _units(shown: str, table: Any) -> dict[str, list[str]]:
    _check_keys(shown, "units.", table, dict.fromkeys(VERBS, list))
    out: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    for verb in VERBS:
        try:
            names = unit_names(_strings(shown, f"units.{verb}", table.get(verb, [])))
        except Refused as e:
            raise Refused(f"{shown}: `units.{verb}`: {e.message()}") from None
        for unit in names:
            if unit in where:
                raise Refused(f"{shown}: {unit} is listed under both `units.{where[unit]}` "
                              f"and `units.{verb}`")
            where[unit] = verb
        if names:
            out[verb] = names
    return out


@dataclass
class RolePlan:
    """The packages' plans (None: none named) and the units' plan."""

    remove: PackagePlan | None
    add: PackagePlan | None
    units: UnitPlan

    def empty(self) -> bool:
        return all(p is None or p.empty() for p in (self.remove, self.add, self.units))

    def to_json(self) -> dict[str, Any]:
        return {"packages": {"remove": self.remove and self.remove.to_json(),
                             "add": self.add and self.add.to_json()},
                "units": self.units.to_json()}

    def lines(self) -> list[str]:
        return [*(self.remove.lines() if self.remove else []),
                *(self.add.lines() if self.add else []), *self.units.lines()]


class RoleApply:
    """`feature apply`: a role's packages and units, as one servicing Change."""

    verb = "feature apply"

    def __init__(self, role: Role) -> None:
        self.role = role
        self._remove = PackageRemove(role.remove, role.purge) if role.remove else None
        self._add = PackageAdd(role.add, role.repository) if role.add else None

    def arguments(self) -> dict[str, Any]:
        return self.role.to_json()

    def plan(self, root: Root) -> RolePlan:
        remove = self._remove.plan(root) if self._remove is not None else None
        add = self._add.plan(root) if self._add is not None else None
        if remove is not None and add is not None:
            both = {a.pkg.name for a in add.actions} & {a.pkg.name for a in remove.actions}
            if both:
                raise Refused(f"the role both adds and removes {', '.join(sorted(both))}")
        requests = self.role.requests()
        units = (plan_units(root, requests, coming=_Shipped(add).get) if requests
                 else UnitPlan())
        return RolePlan(remove, add, units)

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, RolePlan)
        result: dict[str, Any] = {"packages": {}}
        changed = False
        for part, change in (("remove", self._remove), ("add", self._add)):
            pplan = getattr(plan, part)
            if change is not None and pplan is not None and not pplan.empty():
                result["packages"].update(change.apply(target, pplan, progress))
                changed = True
        units = plan.units
        if changed and self.role.requests():
            progress.step("planning the units again on the packages' result")
            units = plan_units(MountRoot(target.root), self.role.requests(),
                               scratch=target.scratch)
        if not units.empty():
            result.update(apply_units(target, units, progress))
        result["already"] = units.already
        return result


class _Shipped:
    """{unit: package} for the unit files the packages of a plan ship, read from their
    data members when first asked (only a unit the image does not have yet asks)."""

    def __init__(self, plan: PackagePlan | None) -> None:
        self.plan = plan
        self._found: dict[str, str] | None = None

    def get(self, unit: str) -> str | None:
        return self.found().get(unit)

    def found(self) -> dict[str, str]:
        if self._found is None:
            self._found = {}
            for action in self.plan.actions if self.plan is not None else []:
                if action.pkg.deb is not None:
                    self._found.update(_units_of(action.pkg.deb))
        return self._found


def _units_of(deb: Deb) -> dict[str, str]:
    from debian.debfile import DebFile

    found = {}
    try:
        names = DebFile(deb.path).data.tgz().getnames()
    except Exception:  # noqa: BLE001 - open_deb checked it already; this is a listing
        return {}
    for name in names:
        raw = os.fsencode(name).removeprefix(b"./")
        for top in UNIT_DIRS:
            if raw.startswith(top) and raw[len(top):] and b"/" not in raw[len(top):]:
                found[os.fsdecode(raw[len(top):])] = f"{deb.name} {deb.version}"
    return found
