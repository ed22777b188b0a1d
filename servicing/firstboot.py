"""The first-boot queue: work that can only run on the booted machine (deferred package
configuration, host keys after generalize, an admin's scripts), queued offline and run
once, in order, at the next boot (DISM's pending operations, virt-customize --firstboot).

On-image layout (servicing.firstboot_files holds the unit and the runner, and says how the
runner treats each item at boot):

    /usr/lib/imagefs/firstboot                     the runner (POSIX sh)
    /etc/systemd/system/imagefs-firstboot.service  its oneshot unit, enabled through
    /etc/systemd/system/multi-user.target.wants/imagefs-firstboot.service
    /var/lib/imagefs/firstboot/queue/NNNN-NAME/    an item to run: `run` (the script),
                                                   `meta` (id, name, origin, added, ...)
    /var/lib/imagefs/firstboot/done/NNNN-NAME/     an item that ran: also `started`,
                                                   `attempts`, `output`, `result` (exit
                                                   code, started, finished, boot id)

NNNN is a number, one more than any item's in queue/ or done/: it is the item's id and its
place in the order.  `meta`, `started` and `result` are key=value lines.

Reading (list_items, pending) works on any servicing.roots.Root, an index read straight
from the image included; writing (enqueue, and the FirstbootAdd and FirstbootRemove
changes of a servicing transaction) works in a writable root, every path of the image
resolved inside it (a symlink in the image never leads the writes out of it).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import CorruptImage, one_line

from .firstboot_files import (
    DONE,
    QUEUE,
    RUNNER,
    RUNNER_PATH,
    UNIT,
    UNIT_NAME,
    UNIT_PATH,
    WANTS_DIR,
    WANTS_LINK,
)
from .roots import MountRoot, Root, make_dirs, write_file
from .transaction import Progress, Refused, ServicingFailed, Target

MAX_SCRIPT = 1 << 20  # bytes of an item's script
MAX_NAME = 64
MAX_ORIGIN = 200
MAX_SMALL = 64 << 10  # meta, started, result, attempts
MAX_OUTPUT = 8 << 20  # an output over this is not read back for a listing
OUTPUT_LINES = 10  # lines of an item's output a listing keeps
LAST_ID = 9999
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
ITEM_DIR = re.compile(r"([0-9]{4})-(.+)\Z", re.S)  # as the runner's glob matches them
PENDING = ("queued", "interrupted")


@dataclass
class Item:
    """One queued or finished item.  state: queued (will run), interrupted (started, never
    finished: will run again), succeeded, failed (exit code not 0), unknown (in done/
    without a result)."""

    id: str
    name: str
    state: str
    path: str  # its directory in the image
    origin: str = ""
    added: str = ""
    attempts: int = 0
    exit_code: int | None = None
    started: str | None = None
    finished: str | None = None
    boot_id: str | None = None
    output: list[str] = field(default_factory=list)  # the first OUTPUT_LINES lines
    output_truncated: bool = False

    @property
    def pending(self) -> bool:
        return self.state in PENDING

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- names and scripts: hostile input, refused with one line --

def check_name(name: str) -> str:
    """name, if it is a short [A-Za-z0-9._-] word starting with a letter or digit and not
    only digits (those are ids); Refused otherwise."""
    if not NAME.match(name) or len(name) > MAX_NAME or name.isdigit():
        raise Refused(f"bad first-boot item name {one_line(name)!r}: use up to {MAX_NAME} "
                      "letters, digits, '.', '_' or '-', starting with a letter or digit, "
                      "not only digits")
    return name


def check_script(script: bytes) -> bytes:
    """script, if it is a text script (UTF-8, no NUL) of at most MAX_SCRIPT bytes."""
    if len(script) > MAX_SCRIPT:
        raise Refused(f"the script is {len(script)} bytes, over the limit of {MAX_SCRIPT}")
    if not script.strip():
        raise Refused("the script is empty")
    try:
        script.decode()
    except UnicodeDecodeError:
        raise Refused("the script is not UTF-8 text") from None
    if b"\0" in script:
        raise Refused("the script holds NUL bytes: it is not a text script")
    return script


def command_script(command: str) -> bytes:
    """The item script of --command CMD: CMD run by /bin/sh."""
    if not command.strip():
        raise Refused("the command is empty")
    return check_script(f"#!/bin/sh\n{command}\n".encode(errors="surrogateescape"))


# -- reading the queue from any Root --

def list_items(root: Root) -> list[Item]:
    """Every item, finished ones (done/) and queued ones, in order of id."""
    found = [_item(root, DONE, d) for d in _item_dirs(root, DONE)]
    found += [_item(root, QUEUE, d) for d in _item_dirs(root, QUEUE)]
    return sorted(found, key=lambda i: (i.id, i.path))


def pending(root: Root) -> list[Item]:
    """The items the next boot will run (queued, or interrupted and run again)."""
    return [i for i in list_items(root) if i.pending]


def _item_dirs(root: Root, where: str) -> list[str]:
    return [n for n in root.names(where) or []
            if ITEM_DIR.match(n) and root.names(f"{where}/{n}") is not None]


def _small(root: Root, path: str, limit: int = MAX_SMALL) -> bytes | None:
    """A file of an item, None when missing or not a plain file of at most limit bytes
    (a listing shows what it can of an odd item rather than failing)."""
    try:
        return root.read(path, limit)
    except CorruptImage:
        return None


def _fields(data: bytes | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (data or b"").decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and len(text) < 10 else None


def _item(root: Root, where: str, dirname: str) -> Item:
    path = f"{where}/{dirname}"
    number, name = ITEM_DIR.match(dirname).groups()  # type: ignore[union-attr]
    meta = _fields(_small(root, f"{path}/meta"))
    started = _fields(_small(root, f"{path}/started"))
    result_data = _small(root, f"{path}/result")
    result = _fields(result_data)
    exit_code = _int(result.get("exit"))
    if result_data is not None:
        state = "succeeded" if exit_code == 0 else "failed"
    elif where == DONE:
        state = "unknown"
    else:
        state = "interrupted" if started else "queued"
    attempts = _int(result.get("attempts")) or _int(
        (_small(root, f"{path}/attempts") or b"").decode(errors="replace").strip()) or 0
    item = Item(number, name, state, path, origin=meta.get("origin", ""),
                added=meta.get("added", ""), attempts=attempts, exit_code=exit_code,
                started=result.get("started") or started.get("started"),
                finished=result.get("finished"),
                boot_id=result.get("boot_id") or started.get("boot_id"))
    if state != "queued":
        item.output, item.output_truncated = _output(root, f"{path}/output")
    return item


def _output(root: Root, path: str) -> tuple[list[str], bool]:
    try:
        data = root.read(path, MAX_OUTPUT)
    except CorruptImage:
        return [f"(output over {MAX_OUTPUT >> 20} MiB or not a file: see {path})"], True
    lines = (data or b"").decode(errors="replace").splitlines()
    return lines[:OUTPUT_LINES], len(lines) > OUTPUT_LINES


# -- writing, in a writable root --

def installed(root: Root) -> list[str]:
    """The paths of the runner, the unit and the unit's enablement that are missing or out
    of date in root (what enqueue will write).  Refused when the unit is masked."""
    check_unmasked(root)
    todo = [p for p, data in ((RUNNER_PATH, RUNNER), (UNIT_PATH, UNIT))
            if _small(root, p, len(data)) != data]
    if _small(root, WANTS_LINK, len(UNIT)) != UNIT:  # the link resolves to our unit
        todo.append(WANTS_LINK)
    return todo


def check_unmasked(root: Root) -> None:
    """Refused when the unit's place holds something else than a file (a mask, a link to
    /dev/null): the items would never run."""
    masked = False
    try:
        root.read(UNIT_PATH, MAX_SMALL)
    except CorruptImage:
        masked = True
    if isinstance(root, MountRoot):
        parent = root.resolve(os.path.dirname(UNIT_PATH))
        masked |= parent is not None and os.path.islink(os.path.join(parent, UNIT_NAME))
    if masked:
        raise Refused(f"{UNIT_NAME} is masked (or not a file) at {UNIT_PATH}: queued items "
                      "would never run; unmask it first (systemctl --root=MNT unmask)")


def install(root: str) -> list[str]:
    """Put the runner and the unit in the root at root, and enable the unit (the symlink
    `systemctl enable` makes); the paths written."""
    mroot = MountRoot(root)
    todo = installed(mroot)
    for path, data, mode in ((RUNNER_PATH, RUNNER, 0o755), (UNIT_PATH, UNIT, 0o644)):
        if path in todo:
            write_file(make_dirs(mroot, os.path.dirname(path), 0o755), os.path.basename(path),
                   data, mode)
    if WANTS_LINK in todo:
        link = os.path.join(make_dirs(mroot, WANTS_DIR, 0o755), UNIT_NAME)
        if os.path.lexists(link):
            if os.path.isdir(link) and not os.path.islink(link):
                raise Refused(f"{WANTS_LINK} is a directory")
            os.unlink(link)
        os.symlink(UNIT_PATH, link)
    return todo


def enqueue(root: str, name: str, script: bytes, origin: str = "") -> str:
    """Add an item after the existing ones in the queue of the writable root at root,
    installing and enabling the unit if needed; the item's id."""
    check_name(name)
    check_script(script)
    mroot = MountRoot(root)
    if not has_systemd(mroot):
        raise Refused("no systemd in this root (no /lib/systemd/systemd): nothing would "
                      "run the first-boot queue")
    install(root)
    make_dirs(mroot, DONE, 0o700)
    queue = make_dirs(mroot, QUEUE, 0o700)
    number = next_id(mroot)
    tmp = os.path.join(queue, f".new-{secrets.token_hex(4)}")  # not matched by the runner
    os.mkdir(tmp, 0o700)
    try:
        write_file(tmp, "run", script, 0o700)
        origin = one_line(origin)[:MAX_ORIGIN]
        meta = (f"id={number}\nname={name}\norigin={origin}\nadded={_now()}\n"
                f"script_bytes={len(script)}\n"
                f"script_sha256={hashlib.sha256(script).hexdigest()}\n")
        write_file(tmp, "meta", meta.encode(), 0o600)
        os.rename(tmp, os.path.join(queue, f"{number}-{name}"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return number


def has_systemd(root: Root) -> bool:
    return "systemd" in (root.names("/lib/systemd") or [])


def next_id(root: Root) -> str:
    """One more than the largest id in queue/ and done/."""
    used = [int(m.group(1)) for where in (QUEUE, DONE) for n in root.names(where) or []
            if (m := ITEM_DIR.match(n))]
    number = max(used, default=0) + 1
    if number > LAST_ID:
        raise Refused(f"the first-boot queue has used every id up to {LAST_ID}")
    return f"{number:04d}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the servicing verbs: changes run in a transaction (servicing.transaction) --

@dataclass
class AddPlan:
    """Queue one item (and install the unit where it is missing)."""

    id: str
    name: str
    script_bytes: int
    install: list[str]

    def empty(self) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [f"queue first-boot item {self.id}-{self.name} ({self.script_bytes} bytes), "
                "to run at the next boot",
                *(f"install {p}" for p in self.install)]


class FirstbootAdd:
    """`imagefs firstboot add`: queue a script to run once at the next boot."""

    verb = "firstboot add"

    def __init__(self, name: str, script_bytes: bytes, origin: str = "") -> None:
        self.name = check_name(name)
        self.script = check_script(script_bytes)
        self.origin = one_line(origin)[:MAX_ORIGIN]

    def arguments(self) -> dict[str, Any]:
        return {"name": self.name, "origin": self.origin, "script_bytes": len(self.script),
                "script_sha256": hashlib.sha256(self.script).hexdigest()}

    def plan(self, root: Root) -> AddPlan:
        if not has_systemd(root):
            raise Refused("no systemd in the image (no /lib/systemd/systemd): nothing "
                          "would run the first-boot queue")
        return AddPlan(next_id(root), self.name, len(self.script), installed(root))

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        progress.step(f"queueing first-boot item {self.name}")
        wrote = install(target.root)
        number = enqueue(target.root, self.name, self.script, self.origin)
        mine = [i for i in pending(MountRoot(target.root))
                if (i.id, i.name) == (number, self.name)]
        if not mine or _small(MountRoot(target.root), WANTS_LINK, len(UNIT)) != UNIT:
            raise ServicingFailed(f"first-boot item {number}-{self.name} is not queued and "
                                  f"enabled after it was written")
        return {"id": number, "name": self.name, "path": mine[0].path, "installed": wrote}


@dataclass
class RemovePlan:
    """Take queued items out of the queue."""

    items: list[Item]

    def empty(self) -> bool:
        return not self.items

    def to_json(self) -> dict[str, Any]:
        return {"items": [i.to_json() for i in self.items]}

    def lines(self) -> list[str]:
        return [f"remove {i.state} first-boot item {i.id}-{i.name}"
                + (f" (added {i.added})" if i.added else "")
                + (f" from {i.origin}" if i.origin else "") for i in self.items]


class FirstbootRemove:
    """`imagefs firstboot remove`: take queued items out; items that ran are history."""

    verb = "firstboot remove"

    def __init__(self, ids_or_names: Sequence[str]) -> None:
        self.words = [str(w) for w in ids_or_names]
        if not self.words:
            raise Refused("name the first-boot items to remove (by id or name)")

    def arguments(self) -> dict[str, Any]:
        return {"items": self.words}

    def plan(self, root: Root) -> RemovePlan:
        every = list_items(root)
        chosen: dict[str, Item] = {}
        for word in self.words:
            found = [i for i in every if _matches(i, word)]
            if not found:
                raise Refused(f"no first-boot item {one_line(word)!r} (see imagefs "
                              "firstboot list)")
            queued = [i for i in found if i.pending]
            if not queued:
                i = found[-1]
                raise Refused(f"first-boot item {i.id}-{one_line(i.name)} already ran "
                              f"({i.state}" + (f", exit code {i.exit_code}"
                                               if i.exit_code is not None else "")
                              + "): it is history and cannot be removed")
            chosen.update((i.path, i) for i in queued)
        return RemovePlan(sorted(chosen.values(), key=lambda i: (i.id, i.path)))

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        mroot = MountRoot(target.root)
        queue = mroot.resolve(QUEUE)
        removed = []
        for item in plan.items:
            progress.step(f"removing first-boot item {item.id}-{item.name}")
            path = os.path.join(queue or "", os.path.basename(item.path))
            if queue is None or not os.path.isdir(path) or os.path.islink(path):
                raise ServicingFailed(f"first-boot item {item.id}-{item.name} is gone")
            shutil.rmtree(path)
            removed.append({"id": item.id, "name": item.name})
        left = {i.path for i in pending(mroot)}
        if any(i.path in left for i in plan.items):
            raise ServicingFailed("a first-boot item is still queued after its removal")
        return {"removed": removed}


def _matches(item: Item, word: str) -> bool:
    """word names item: its id (0003 or 3), its directory (0003-name) or its name."""
    if word.isdigit():
        return len(word) <= 4 and int(word) == int(item.id)
    return word in (item.name, f"{item.id}-{item.name}")
