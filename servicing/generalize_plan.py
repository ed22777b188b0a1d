"""What a generalize operation plans: exact actions on exact paths, with sizes.

An operation (servicing.generalize_ops) looks at the index through a never-following Tree
and records, through a Planner, each path it will remove, empty, rewrite or relink, and
the first-boot item it will queue.  The plan is the whole truth: --dry-run prints it, the
apply does exactly it (servicing.generalize_fs) and the history records it.

Rules every operation shares (Planner): a path is planned once (the first operation that
claims it); a file or directory a package owns (listed in the image's dpkg
/var/lib/dpkg/info/*.list) is never removed (a package's log file is emptied instead, where
the operation says so); a directory is removed only once everything in it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import firstboot
from .generalize_tree import DIR, FILE, LINK, Node, Tree, below, join, shown
from .roots import Root

DPKG_INFO = "/var/lib/dpkg/info"
MAX_LIST = 64 << 20  # bytes of one dpkg .list file
# Where operations clean whole trees: the package-owned paths under these are looked up.
CLEANED = ("/var/log/", "/tmp/", "/var/tmp/", "/var/cache/apt/", "/var/lib/apt/lists/",
           "/var/lib/cloud/", "/var/crash/", "/var/lib/systemd/coredump/",
           "/var/lib/apport/coredump/")
REMOVE, EMPTY, WRITE, RELINK = "remove", "empty", "write", "link"
MKDIR, CREATE = "mkdir", "create"  # a directory, a file, where there is none


def size_text(n: int) -> str:
    """n bytes for a plan line (B, KiB, MiB, GiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass
class Action:
    """One change: remove the path (a file, symlink, directory or other), empty a file,
    write new bytes into it, make it a symlink to target, or (where nothing is) make a
    directory or a new file."""

    action: str
    path: str
    kind: str  # what is there now
    size: int  # a file's bytes now
    data: bytes = b""  # write: the new bytes
    target: str = ""  # link: the new target; remove of a symlink: where it pointed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "path": shown(self.path),
                               "kind": self.kind, "size": self.size}
        if self.action in (WRITE, CREATE):
            out["new"] = self.data.decode(errors="backslashreplace")
            out["new_size"] = len(self.data)
        if self.target:
            out["target"] = shown(self.target)
        return out

    def line(self) -> str:
        path = shown(self.path)
        was = (f"a file of {size_text(self.size)}" if self.kind == FILE
               else f"a symlink to {shown(self.target)}" if self.kind == LINK
               else f"a {self.kind}")
        if self.action == REMOVE:
            what = (size_text(self.size) if self.kind == FILE else "directory"
                    if self.kind == DIR else f"symlink to {shown(self.target)}"
                    if self.kind == LINK else self.kind)
            return f"remove {path}{'/' if self.kind == DIR else ''} ({what})"
        if self.action == EMPTY:
            return f"empty {path} ({size_text(self.size)} -> 0 B, owner and mode kept)"
        if self.action == WRITE:
            new = self.data.decode(errors="backslashreplace").strip()
            shown_new = repr(new) if "\n" not in new and len(new) <= 40 else (
                f"{len(new.splitlines())} lines")
            return f"write {path} ({was} -> {size_text(len(self.data))}: {shown_new})"
        if self.action == MKDIR:
            return f"create {path}/ (directory)"
        if self.action == CREATE:
            return f"create {path} ({size_text(len(self.data))})"
        return f"link {path} -> {shown(self.target)} (was {was})"


@dataclass
class Queued:
    """A first-boot item the operation queues (servicing.firstboot)."""

    name: str
    id: str
    script: bytes
    why: str  # when it runs, what for: for the plan's line
    install: list[str]  # the first-boot unit's files written with it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "script": self.script.decode(),
                "why": self.why, "install": self.install}

    def lines(self) -> list[str]:
        command = "; ".join(line for line in self.script.decode().splitlines()
                            if line and not line.startswith("#") and line != "set -e")
        return [f"queue first-boot item {self.id}-{self.name}: {command} ({self.why})",
                *(f"install {p}" for p in self.install)]


@dataclass
class OpPlan:
    """What one operation will do, and what it saw but leaves alone (notes)."""

    name: str
    description: str
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    queue: Queued | None = None

    def empty(self) -> bool:
        return not self.actions and self.queue is None

    def removed_bytes(self) -> int:
        return sum(a.size for a in self.actions if a.action in (REMOVE, EMPTY))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "actions": [a.to_json() for a in self.actions], "notes": self.notes,
                "queue": self.queue.to_json() if self.queue else None,
                "paths_removed": sum(1 for a in self.actions if a.action == REMOVE),
                "bytes_removed": self.removed_bytes()}

    def lines(self) -> list[str]:
        removed = sum(1 for a in self.actions if a.action == REMOVE)
        other = len(self.actions) - removed
        if self.empty():
            head = f"{self.name}: nothing to do"
        else:
            parts = [f"{removed} path{'' if removed == 1 else 's'} removed"] if removed else []
            parts += [f"{other} changed"] if other else []
            parts += ["1 first-boot item queued"] if self.queue else []
            head = (f"{self.name}: {', '.join(parts)}"
                    + (f" ({size_text(self.removed_bytes())})" if self.removed_bytes()
                       else ""))
        return [head, *(f"  {a.line()}" for a in self.actions),
                *(f"  {q}" for q in (self.queue.lines() if self.queue else [])),
                *(f"  (left alone: {n})" for n in self.notes)]


class Planner:
    """Collects the actions of each operation in turn over one Tree (the index seen
    without following symlinks); root is the same index as servicing reads it (symlinks
    resolved inside), for questions about the system (is sshd there, the queue)."""

    def __init__(self, tree: Tree, root: Root) -> None:
        self.tree = tree
        self.root = root
        self.claimed: set[str] = set()
        self.queued: list[Queued] = []
        self._owned: set[str] | None = None
        self.op = OpPlan("", "")

    def start(self, name: str, description: str) -> OpPlan:
        self.op = OpPlan(name, description)
        return self.op

    def owned(self, path: str) -> bool:
        """Does a package own path (in the image's dpkg lists)?  Only paths under CLEANED
        are known; the lists are read once."""
        if self._owned is None:
            self._owned = set()
            for name in self.tree.names(DPKG_INFO):
                if name.endswith(".list"):
                    data = self.tree.read(join(DPKG_INFO, name), MAX_LIST) or b""
                    for line in data.decode(errors="surrogateescape").splitlines():
                        if line.startswith(CLEANED):
                            self._owned.add(line.rstrip("/"))
        return path in self._owned

    def note(self, text: str) -> None:
        self.op.notes.append(text)

    def _add(self, action: Action) -> bool:
        if action.path in self.claimed:
            return False
        self.claimed.add(action.path)
        self.op.actions.append(action)
        return True

    def remove(self, path: str, node: Node) -> bool:
        """Plan the removal of path (as it is: a symlink, never its target)."""
        return self._add(Action(REMOVE, path, node.kind, node.size, target=node.target))

    def empty(self, path: str, node: Node) -> bool:
        return self._add(Action(EMPTY, path, node.kind, node.size))

    def write(self, path: str, node: Node, data: bytes) -> bool:
        return self._add(Action(WRITE, path, node.kind, node.size, data=data))

    def relink(self, path: str, node: Node, target: str) -> bool:
        return self._add(Action(RELINK, path, node.kind, node.size, target=target))

    def mkdir(self, path: str) -> bool:
        return self._add(Action(MKDIR, path, "none", 0))

    def create(self, path: str, data: bytes) -> bool:
        return self._add(Action(CREATE, path, "none", 0, data=data))

    def queue(self, name: str, script: bytes, why: str) -> None:
        """Queue script as the first-boot item name (after those queued so far); the
        first one also installs the queue's unit where it is missing."""
        first = not self.queued
        number = int(firstboot.next_id(self.root)) + len(self.queued)
        self.op.queue = Queued(name, f"{number:04d}", script, why,
                               firstboot.installed(self.root) if first else [])
        self.queued.append(self.op.queue)

    def clear(self, base: str, *, dirs: bool = True,
              keep: Callable[[str, Node], bool] | None = None,
              owned_files: str = "keep") -> None:
        """Plan the removal of what is under the real directory base (never base): every
        file, symlink and other entry, and with dirs every directory once its contents
        go.  keep(path, node) leaves a path alone; a package's file is left alone
        (owned_files="keep") or emptied ("empty"); a package's directory stays."""
        stays: set[str] = set()  # directories that keep something
        for path, node in below(self.tree, base):
            parent = path.rsplit("/", 1)[0]
            if keep is not None and keep(path, node):
                stays.add(parent)
                continue
            if node.kind == DIR:
                if path in stays or not dirs or self.owned(path):
                    stays.add(parent)
                else:
                    self.remove(path, node)
                continue
            if self.owned(path):
                stays.add(parent)
                if owned_files == "empty" and node.kind == FILE and node.size:
                    self.empty(path, node)
                continue
            self.remove(path, node)
