"""`imagefs generalize`: strip one machine's identity from an index so that every clone of it
is a new machine (Sysprep /generalize, virt-sysprep), as a servicing transaction.

The operations (servicing.generalize_ops) are planned from the index read straight from
the image, never following a symlink (servicing.generalize_tree), into exact actions on
exact paths with their sizes (servicing.generalize_plan): --dry-run prints them, the
apply does exactly them in the transaction's writable session without following any
symlink (servicing.generalize_fs), checks that each one holds, and the history entry
records them.  Nothing runs in the image's container: every change is a file's.

Which operations run is virt-sysprep's --operations syntax (`select`): `A,B` only those,
`-C` the defaults without C, `+D` the defaults and D, `defaults` and `all` as words.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from imagefs.errors import Refused, ServicingFailed, UsageError, one_line

from . import firstboot
from .generalize_fs import InRoot
from .generalize_ops import BY_NAME, MACHINE_ID, OPERATIONS, UNINITIALIZED, Operation
from .generalize_plan import (
    CREATE,
    EMPTY,
    MKDIR,
    RELINK,
    REMOVE,
    WRITE,
    Action,
    OpPlan,
    Planner,
)
from .generalize_tree import DIR, FILE, LINK, shown, tree_of
from .roots import MountRoot, Root
from .transaction import Progress, Target

MAX_SPEC = 4096
HISTORY_PATHS = 500  # removed paths of one operation kept in the history entry
WORD = re.compile(r"([+-]?)([a-z0-9][a-z0-9-]*)\Z")
GROUPS = ("defaults", "all")


def defaults() -> list[str]:
    return [op.name for op in OPERATIONS if op.default]


def select(spec: str | None) -> list[str]:
    """The operations a --operations spec chooses, in the order they run (machine-id last).

    None: the defaults.  A comma-separated list of words: NAME adds it to an empty choice,
    as do `defaults` and `all` their groups; +NAME adds and -NAME removes; when there are
    only +/- words the choice starts from the defaults.  UsageError, one line, for a
    syntax error, an unknown name, a name both added and removed, or an empty choice."""
    if spec is None:
        return defaults()
    if len(spec) > MAX_SPEC:
        raise UsageError(f"--operations is over {MAX_SPEC} characters")
    words = [w.strip() for w in spec.split(",")]
    parsed = []
    for word in words:
        m = WORD.match(word)
        if not word:
            raise UsageError(f"--operations {one_line(spec)!r}: an empty name (two commas, "
                             "or one at an end)")
        if m is None or (m.group(2) not in BY_NAME and m.group(2) not in GROUPS):
            raise UsageError(_unknown(word))
        if m.group(2) in GROUPS and m.group(1):
            raise UsageError(f"--operations: {word!r}: `{m.group(2)}` is a group; write it "
                             f"without {m.group(1)!r}")
        parsed.append((m.group(1), m.group(2)))
    signs: dict[str, set[bool]] = {}
    for sign, name in parsed:
        if name not in GROUPS:
            signs.setdefault(name, set()).add(sign == "-")
    both = sorted(n for n, s in signs.items() if len(s) == 2)
    if both:
        raise UsageError(f"--operations: {both[0]} is both chosen and left out")
    chosen: set[str] = set() if any(not sign for sign, _n in parsed) else set(defaults())
    for sign, name in parsed:
        names = (defaults() if name == "defaults" else list(BY_NAME) if name == "all"
                 else [name])
        if sign == "-":
            chosen.difference_update(names)
        else:
            chosen.update(names)
    if not chosen:
        raise UsageError("--operations chooses no operation (imagefs generalize --list "
                         "shows them)")
    return [op.name for op in OPERATIONS if op.name in chosen]


def _unknown(word: str) -> str:
    name = word.lstrip("+-")
    near = difflib.get_close_matches(name, [*BY_NAME, *GROUPS], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return (f"--operations: unknown operation {one_line(name)!r}{hint}; imagefs generalize "
            "--list shows them")


def listing(spec: str | None = None) -> list[dict[str, Any]]:
    """The operations for --list and generalize.list: name, what it does, whether it runs
    by default, the paths it looks at and (for spec) whether spec chooses it."""
    chosen = set(select(spec))
    return [{"name": op.name, "description": op.description, "default": op.default,
             "selected": op.name in chosen, "paths": list(op.paths)} for op in OPERATIONS]


@dataclass
class GeneralizePlan:
    """The operations chosen, in order, each with its exact actions."""

    operations: list[OpPlan]

    def empty(self) -> bool:
        return all(op.empty() for op in self.operations)

    def actions(self) -> list[Action]:
        return [a for op in self.operations for a in op.actions]

    def to_json(self) -> dict[str, Any]:
        every = self.actions()
        return {"operations": [op.to_json() for op in self.operations],
                "paths_removed": sum(1 for a in every if a.action == REMOVE),
                "bytes_removed": sum(op.removed_bytes() for op in self.operations),
                "paths_changed": sum(1 for a in every if a.action != REMOVE),
                "items_queued": sum(1 for op in self.operations if op.queue)}

    def lines(self) -> list[str]:
        return [line for op in self.operations for line in op.lines()]


class Generalize:
    """The servicing Change of `imagefs generalize`."""

    verb = "generalize"

    def __init__(self, operations: str | None = None) -> None:
        self.spec = operations
        self.names = select(operations)

    def arguments(self) -> dict[str, Any]:
        return {"operations": self.names, "spec": self.spec}

    def plan(self, root: Root) -> GeneralizePlan:
        planner = Planner(tree_of(root), root)
        plans = []
        for name in self.names:
            op: Operation = BY_NAME[name]
            plans.append(planner.start(op.name, op.description))
            op.plan(planner)
        return GeneralizePlan(plans)

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        assert isinstance(plan, GeneralizePlan)
        done = []
        with InRoot(target.root) as fs:
            for op in plan.operations:
                queued = None
                if not op.empty():
                    progress.step(f"generalize: {op.name}")
                    for action in op.actions:
                        _do(fs, action)
                    if op.queue is not None:
                        queued = firstboot.enqueue(target.root, op.queue.name,
                                                   op.queue.script, f"generalize {op.name}")
                done.append(_result(op, queued))
            progress.step("generalize: checking every change")
            _check(fs, plan, target.root)
        every = plan.to_json()
        return {"operations": done,
                **{k: every[k] for k in ("paths_removed", "bytes_removed", "paths_changed",
                                         "items_queued")}}


def _do(fs: InRoot, a: Action) -> None:
    if a.action == REMOVE:
        fs.remove(a.path, a.kind)
    elif a.action == EMPTY:
        fs.empty(a.path)
    elif a.action == WRITE:
        fs.write(a.path, a.data, 0o444 if a.path == MACHINE_ID else 0o644)
    elif a.action == MKDIR:
        fs.mkdir(a.path)
    elif a.action == CREATE:
        fs.create(a.path, a.data)
    else:
        fs.symlink(a.path, a.target)


def _check(fs: InRoot, plan: GeneralizePlan, root: str) -> None:
    """Every planned change holds in the session: removed paths are gone, emptied files
    empty, written files hold their bytes, links point where planned, items are queued."""
    for a in plan.actions():
        now = fs.node(a.path)
        ok = (now is None if a.action == REMOVE
              else now is not None and now.kind == FILE and now.size == 0
              if a.action == EMPTY
              else fs.read(a.path, len(a.data) + 1) == a.data if a.action in (WRITE, CREATE)
              else now is not None and now.kind == DIR if a.action == MKDIR
              else now is not None and now.kind == LINK and now.target == a.target)
        if not ok:
            raise ServicingFailed(f"after generalize, {shown(a.path)} is not as planned "
                                  f"({a.action})")
    names = {i.name for i in firstboot.pending(MountRoot(root))}
    for op in plan.operations:
        if op.queue is not None and op.queue.name not in names:
            raise ServicingFailed(f"first-boot item {op.queue.name} is not queued")
    if any(a.path == MACHINE_ID for a in plan.actions()) and \
            fs.read(MACHINE_ID, 64) != UNINITIALIZED:
        raise ServicingFailed(f"{MACHINE_ID} was rewritten during generalize")


def _result(op: OpPlan, queued: str | None) -> dict[str, Any]:
    """What one operation did, for the history (removed paths: the first HISTORY_PATHS)."""
    removed = [shown(a.path) for a in op.actions if a.action == REMOVE]
    return {"name": op.name, "paths_removed": len(removed),
            "bytes_removed": op.removed_bytes(),
            "paths": removed[:HISTORY_PATHS], "more": max(0, len(removed) - HISTORY_PATHS),
            "emptied": [shown(a.path) for a in op.actions if a.action == EMPTY],
            "changed": [shown(a.path) for a in op.actions if a.action in (WRITE, RELINK)],
            "created": [shown(a.path) for a in op.actions if a.action in (MKDIR, CREATE)],
            "queued": ({"id": queued, "name": op.queue.name}
                       if queued and op.queue else None),
            "notes": op.notes}


def survey(image_path: str, index: str) -> dict[str, Any]:
    """What each operation finds in one index (nothing changes): per operation, the
    paths it would change, the bytes it would remove, whether it would queue a first-boot
    item, and (`refused`) why it would refuse to run."""
    from imagefs.image import Image

    from .roots import IndexRoot

    found: dict[str, dict[str, Any]] = {}
    with Image.open(image_path) as img:
        number, entry = img.select(index)
        root = IndexRoot(img.view(number))
        planner = Planner(tree_of(root), root)
        for op in OPERATIONS:
            plan = planner.start(op.name, op.description)
            try:
                op.plan(planner)
            except Refused as e:
                found[op.name] = {"paths": 0, "bytes": 0, "queue": False,
                                  "refused": e.message()}
                continue
            found[op.name] = {"paths": len(plan.actions), "bytes": plan.removed_bytes(),
                              "queue": plan.queue is not None}
    return {"index": number, "name": entry.name, "found": found}
