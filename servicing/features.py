"""Features: the systemd units of an index, listed, enabled, disabled, masked and unmasked
offline (DISM's /Get-Features, /Enable-Feature, /Disable-Feature).

The host's `systemctl --root` is the engine (servicing.feature_systemctl).  `feature list`
and every plan ask it about a private copy of the index's unit directories read straight
from the image (servicing.feature_tree: no mount); the change itself is
`systemctl --root=MNT enable|disable|mask|unmask UNIT...` in the transaction's writable
session, never `preset-all`.  A plan refuses, naming each unit, what systemctl would
refuse or silently not do (an unknown unit, an alias, enabling a masked or static unit,
unmasking a mask its package ships), and leaves alone what is already so.

Debian's own bookkeeping follows (servicing.feature_debian, in the image's container): the
SysV rc links of a unit that also has an /etc/init.d script (what systemctl would have
the host's systemd-sysv-install do), and deb-systemd-helper's state, so that a later
reinstall or upgrade of the package keeps the admin's choice: a disabled unit stays
disabled, a mask stays a mask.  After the change every unit's state is checked with
`systemctl --root=MNT is-enabled`, and the history entry records each unit's state before
and after and every link and state file created or removed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import UsageError, one_line
from imagefs.image import Image

from .feature_debian import Facts, snapshot, snapshot_diff, sync_debian
from .feature_systemctl import UnitFile, list_unit_files, systemctl, unit_states
from .feature_tree import unit_tree
from .roots import IndexRoot, MountRoot, Root
from .transaction import Progress, Refused, ServicingFailed, Target

VERBS = ("enable", "disable", "mask", "unmask")
ORDER = ("unmask", "disable", "enable", "mask")  # the order a mixed change is applied in
SUFFIXES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer",
            "path", "slice", "scope")
_PREFIX = r"[A-Za-z0-9:_.\\-]+"
UNIT = re.compile(rf"{_PREFIX}(@(?:{_PREFIX})?)?\.(?:{'|'.join(SUFFIXES)})\Z")
BARE = re.compile(rf"{_PREFIX}(@(?:{_PREFIX})?)?\Z")  # systemctl adds .service to these
MAX_UNIT = 255  # systemd's UNIT_NAME_MAX, less its NUL
MASKED = ("masked", "masked-runtime")
WANT = {"enable": "enabled", "disable": "disabled", "mask": "masked", "unmask": "unmasked"}


def unit_name(word: str) -> str:
    """word as systemctl takes it: a valid unit name, or a bare name that gets .service
    added; Refused, naming it, otherwise (a path, a control character, no name)."""
    if len(word) <= MAX_UNIT and UNIT.match(word):
        return word
    if len(word) <= MAX_UNIT - 8 and BARE.match(word) and word not in (".", ".."):
        return f"{word}.service"
    raise Refused(f"bad unit name {one_line(repr(word[:300]))}: a unit name is letters, "
                  "digits and ':_.\\-' (with one '@' for a template or instance) and a type "
                  "suffix such as .service or .timer")


def unit_names(words: Sequence[str]) -> list[str]:
    """Each word as a unit name (unit_name), once, in order; Refused naming every bad
    one."""
    out: dict[str, None] = {}
    bad = []
    for word in words:
        try:
            out[unit_name(word)] = None
        except Refused as e:
            bad.append(e.message())
    if bad:
        raise Refused("; ".join(bad))
    return list(out)


# -- listing --

@dataclass
class FeatureList:
    """The unit files of an index (or of a mount) and their states."""

    image: str | None
    index: int | None
    name: str | None
    mount: str | None
    units: list[UnitFile]

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for u in self.units:
            counts[u.state] = counts.get(u.state, 0) + 1
        return {"image": self.image, "index": self.index, "name": self.name,
                "mount": self.mount, "units": [u.to_json() for u in self.units],
                "counts": counts}


def list_features(image_path: str, index_spec: str) -> FeatureList:
    """Every unit file of the index and its state, as `systemctl --root=MNT
    list-unit-files` reports them on a mount of it (without mounting)."""
    with Image.open(image_path) as img:
        view = img.view(index_spec)
        with unit_tree(IndexRoot(view)) as tree:
            units = list_unit_files(tree)
    return FeatureList(view.image.path, view.number, view.entry.name, None, units)


def list_features_mount(mountpoint: str) -> FeatureList:
    """The same for a directory holding a root (a writable mount)."""
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: not a directory")
    root = MountRoot(mountpoint)
    with unit_tree(root) as tree:
        units = list_unit_files(tree)
    return FeatureList(None, None, None, root.path, units)


# -- planning --

@dataclass
class UnitAction:
    """One unit's change: verb, its state now ("" when a package of the same change brings
    it) and the Debian bookkeeping that goes with it."""

    unit: str
    verb: str
    state: str
    sysv: bool = False  # its /etc/init.d script's rc links follow (update-rc.d)
    dsh: str = ""  # deb-systemd-helper: "update-state", "forget-mask" or ""
    systemctl: bool = True  # False: only the bookkeeping changes (a mask taken over)
    note: str = ""

    def line(self) -> str:
        now = self.state or "not installed yet"
        extra = [self.note] if self.note else []
        if self.sysv:
            extra.append(f"SysV rc links follow (update-rc.d {self.verb})")
        return (f"{self.verb} {self.unit} ({now} -> {WANT[self.verb]})"
                + (f"; {'; '.join(extra)}" if extra else ""))


@dataclass
class UnitPlan:
    """What a feature change will do to one index."""

    actions: list[UnitAction] = field(default_factory=list)
    already: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.actions

    def to_json(self) -> dict[str, Any]:
        return {"units": [asdict(a) for a in self.actions], "already": self.already}

    def lines(self) -> list[str]:
        return [a.line() for a in self.actions] + self.already


def plan_units(root: Root, requests: Sequence[tuple[str, str]],
               coming: Callable[[str], str | None] | None = None,
               scratch: str | None = None) -> UnitPlan:
    """The plan of (verb, unit) requests in root; coming(unit): the package of the same
    change that brings a unit root does not have yet (None: none).  Refused naming every unit that
    cannot be changed so."""
    units = list(dict.fromkeys(u for _v, u in requests))
    with unit_tree(root, scratch) as tree:
        states, unknown = unit_states(tree, units)
    facts = Facts(root)
    plan, problems = UnitPlan(), []
    for verb, unit in requests:
        if unit in unknown:
            source = coming(unit) if coming is not None else None
            if source is not None:
                plan.actions.append(_action(verb, unit, "", facts, f"comes with {source}"))
            else:
                problems.append(_unknown(unit, unknown[unit]))
            continue
        try:
            action = decide(verb, unit, states[unit], facts)
        except Refused as e:
            problems.append(e.message())
            continue
        if isinstance(action, str):
            plan.already.append(action)
        else:
            plan.actions.append(action)
    if problems:
        raise Refused("; ".join(problems))
    return plan


def _unknown(unit: str, why: str) -> str:
    if why.startswith("No such file"):
        return f"unknown unit {unit}: the image has no unit file of that name"
    return f"unit {unit}: systemctl cannot tell its state ({one_line(why)})"


def _action(verb: str, unit: str, state: str, facts: Facts, note: str = "") -> UnitAction:
    plain = "@" not in unit  # deb-systemd-helper keeps no state for templates
    sysv = (verb in ("enable", "disable") and unit.endswith(".service")
            and facts.sysv_script(unit.removesuffix(".service")))
    dsh = ""
    if facts.dsh and plain and verb in ("enable", "disable"):
        dsh = "update-state"
    elif verb in ("mask", "unmask") and facts.dsh_masked(unit):
        dsh = "forget-mask"
    return UnitAction(unit, verb, state, sysv=sysv, dsh=dsh, note=note)


def decide(verb: str, unit: str, state: str, facts: Facts) -> UnitAction | str:
    """The action for verb on unit in state, or a line saying it is already so; Refused
    for what systemctl would refuse or not do."""
    if state == "alias":
        raise Refused(f"{unit} is an alias of {facts.alias_of(unit) or 'another unit'}: "
                      "name that unit")
    if state in ("bad", "generated", "transient") and verb in ("enable", "disable"):
        raise Refused(f"{unit} is {state}: not a unit file systemctl can {verb}")
    if verb == "enable":
        return _enable(unit, state, facts)
    if verb == "disable":
        return _disable(unit, state, facts)
    if verb == "mask":
        return _mask(unit, state, facts)
    return _unmask(unit, state, facts)


def _enable(unit: str, state: str, facts: Facts) -> UnitAction | str:
    if state == "enabled":
        return f"{unit} is already enabled"
    if state in MASKED:
        raise Refused(f"{unit} is masked: unmask it first")
    if state == "static":
        raise Refused(f"{unit} is static: it has no [Install] section, so nothing can "
                      "enable it (it starts when another unit needs it)")
    if state == "indirect":
        raise Refused(f"{unit} is indirect: enabling it enables only the units its Also= "
                      "names; enable those")
    return _action("enable", unit, state, facts)


def _disable(unit: str, state: str, facts: Facts) -> UnitAction | str:
    if state == "disabled":
        return f"{unit} is already disabled"
    if state in MASKED:
        return f"{unit} is masked: it cannot start (left as it is)"
    if state == "static":
        raise Refused(f"{unit} is static: nothing enables it, so disable cannot stop it "
                      "from starting; mask it instead")
    if state == "indirect":
        raise Refused(f"{unit} is indirect: it starts through the units its Also= names or "
                      "under other names; disable those, or mask it")
    if state.startswith("linked"):
        raise Refused(f"{unit} is {state} from outside the unit directories: disable would "
                      "remove it from systemd altogether; mask it instead")
    return _action("disable", unit, state, facts)


def _mask(unit: str, state: str, facts: Facts) -> UnitAction | str:
    if state == "masked":
        if facts.masked_at(unit) == "etc" and facts.dsh_masked(unit):
            action = _action("mask", unit, state, facts, "the mask deb-systemd-helper made "
                             "becomes the admin's (a reinstall would lift it)")
            action.systemctl = False
            return action
        return f"{unit} is already masked"
    if facts.admin_file(unit):
        raise Refused(f"{unit}: /etc/systemd/system/{unit} is a unit file of its own; "
                      "masking would need its place: remove it first")
    return _action("mask", unit, state, facts)


def _unmask(unit: str, state: str, facts: Facts) -> UnitAction | str:
    if state not in MASKED:
        return f"{unit} is not masked"
    if facts.masked_at(unit) is None:
        raise Refused(f"{unit} is masked by the package that ships it (a /dev/null link "
                      "in its unit directory): unmask cannot lift that")
    return _action("unmask", unit, state, facts)


# -- applying --

def apply_units(target: Target, plan: UnitPlan, progress: Progress) -> dict[str, Any]:
    """Do plan in the writable root target.root with the host's systemctl --root, keep
    Debian's bookkeeping, check every unit's state; what changed, for the history."""
    root = target.root
    before = snapshot(root)
    for verb in ORDER:
        units = [a.unit for a in plan.actions if a.verb == verb and a.systemctl]
        if units:
            progress.step(f"systemctl --root {verb} {' '.join(units)}")
            out = systemctl(root, [verb, "--", *units])
            if out.returncode != 0:
                lines = (out.stderr or out.stdout).strip().splitlines() or ["no output"]
                raise ServicingFailed(f"systemctl {verb} failed: {one_line(lines[-1])}",
                                      out.stdout + out.stderr)
    progress.step("keeping Debian's unit bookkeeping (update-rc.d, deb-systemd-helper)")
    debian = sync_debian(root, plan.actions)
    progress.step("checking with systemctl --root is-enabled")
    units = [a.unit for a in plan.actions]
    states, unknown = unit_states(root, units)
    wrong = [f"{a.unit} is {states.get(a.unit) or unknown.get(a.unit, '?')}, not "
             f"{WANT[a.verb]}" for a in plan.actions if not _as_wanted(a, states)]
    if wrong:
        raise ServicingFailed("after the change " + "; ".join(wrong))
    return {"units": [{"unit": a.unit, "verb": a.verb, "from": a.state or None,
                       "to": states[a.unit], **debian.get(a.unit, {})}
                      for a in plan.actions],
            "links": snapshot_diff(before, snapshot(root))}


def _as_wanted(action: UnitAction, states: Mapping[str, str]) -> bool:
    state = states.get(action.unit)
    if action.verb == "unmask":
        return state is not None and state not in MASKED
    return state == WANT[action.verb]


class FeatureChange:
    """`feature enable|disable|mask|unmask`: one verb on units, as a servicing Change."""

    def __init__(self, verb: str, units: Sequence[str]) -> None:
        if verb not in VERBS:
            raise UsageError(f"unknown feature verb {verb!r}: use one of {', '.join(VERBS)}")
        self.action = verb
        self.verb = f"feature {verb}"
        self.units = unit_names(units)
        if not self.units:
            raise UsageError("name the units to change (such as chrony.service)")

    def arguments(self) -> dict[str, Any]:
        return {"units": self.units}

    def plan(self, root: Root) -> UnitPlan:
        return plan_units(root, [(self.action, u) for u in self.units])

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, UnitPlan)
        return apply_units(target, plan, progress)
