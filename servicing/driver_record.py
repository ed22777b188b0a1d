"""What `imagefs driver add` put in an image, kept in the image itself so that `driver list`
can say where each driver came from and `driver remove` can take exactly that back out:

    /var/lib/imagefs/drivers.json
      {"format": 1,
       "modules":  [{"kernel", "name", "path" (under lib/modules/KVER), "sha256", "size",
                     "version", "vermagic", "depends", "firmware", "source", "folder",
                     "added"}],
       "firmware": [{"name" (under lib/firmware), "sha256", "size", "source",
                     "needed_by": ["KVER/module", ...]}],
       "directories": [directories driver add made, removed again when empty]}

Modules go to lib/modules/KVER/updates/imagefs/ (depmod's default search order puts
updates/ before the kernel's own modules), firmware to lib/firmware/NAME, as modinfo -F
firmware names it.  The record is read like any of the image's files: bounded, and
every entry checked (a path outside those two places, or any malformed entry, makes it
damaged, and nothing is done from it).

Also the file operations the changes need in a writable root: directories made inside
the root (symlinks resolved inside it), files written whole (a new file renamed over),
files removed, and directories made earlier removed when empty.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import CorruptImage, Refused, one_line

from .driver_modinfo import NAME, NotAModule, check_firmware_name
from .roots import MountRoot, Root, make_dirs, write_file

RECORD = "/var/lib/imagefs/drivers.json"
UPDATES = "updates/imagefs"  # under lib/modules/KVER
MAX_RECORD = 16 << 20
MODULE_PATH = re.compile(r"updates/imagefs/[A-Za-z0-9_-]{1,55}\.ko(\.xz|\.zst|\.gz)?\Z")
STR_FIELDS = ("kernel", "name", "path", "sha256", "version", "vermagic", "source", "folder",
              "added")


@dataclass
class Record:
    """The drivers imagefs added to one image."""

    modules: list[dict[str, Any]] = field(default_factory=list)
    firmware: list[dict[str, Any]] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)

    def module(self, kernel: str, name: str) -> dict[str, Any] | None:
        return next((m for m in self.modules if (m["kernel"], m["name"]) == (kernel, name)),
                    None)

    def firmware_entry(self, name: str) -> dict[str, Any] | None:
        return next((f for f in self.firmware if f["name"] == name), None)

    def empty(self) -> bool:
        return not self.modules and not self.firmware

    def to_bytes(self) -> bytes:
        doc = {"format": 1, "modules": self.modules, "firmware": self.firmware,
               "directories": self.directories}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def read_record(root: Root) -> Record:
    """The record of root (empty when there is none); CorruptImage when it is damaged."""
    data = root.read(RECORD, MAX_RECORD)
    if data is None:
        return Record()
    try:
        doc = json.loads(data.decode("utf-8"))
        return _checked(doc)
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError,
            NotAModule) as e:
        raise CorruptImage(root.label, f"{RECORD} is damaged ({one_line(str(e))[:80]}); "
                           "driver list and remove rely on it") from None


def _checked(doc: Any) -> Record:
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise ValueError("not a format 1 record")
    rec = Record(list(doc["modules"]), list(doc["firmware"]), list(doc.get("directories", [])))
    if not all(isinstance(e, dict) for e in [*rec.modules, *rec.firmware]):
        raise ValueError("an entry is not an object")
    for m in rec.modules:
        if not all(isinstance(m.get(k), str) for k in STR_FIELDS):
            raise ValueError("a module entry lacks a field")
        if not NAME.match(m["name"]) or not MODULE_PATH.match(m["path"]):
            raise ValueError(f"module entry {m['name']!r} at {m['path']!r}")
        if not all(isinstance(m[k], list) and all(isinstance(x, str) for x in m[k])
                   for k in ("depends", "firmware")):
            raise ValueError("a module entry's depends or firmware")
        for fw in m["firmware"]:
            check_firmware_name(fw, RECORD)
    for f in rec.firmware:
        check_firmware_name(f["name"], RECORD)
        if not (isinstance(f["sha256"], str) and isinstance(f["source"], str)
                and isinstance(f["needed_by"], list)
                and all(isinstance(x, str) for x in f["needed_by"])):
            raise ValueError("a firmware entry")
    if not all(isinstance(d, str) and d.startswith("/") and ".." not in d.split("/")
               for d in rec.directories):
        raise ValueError("a directory entry")
    return rec


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def remove_file(root: MountRoot, path: str) -> bool:
    """Remove the file at path in root (the last component itself, never what a symlink
    there points to); False when there was none."""
    parent = root.resolve(os.path.dirname(path))
    if parent is None:
        return False
    host = os.path.join(parent, os.path.basename(path))
    if not os.path.lexists(host):
        return False
    if os.path.isdir(host) and not os.path.islink(host):
        raise Refused(f"{path} in the image is a directory")
    os.unlink(host)
    return True


def prune_dirs(root: MountRoot, rec: Record) -> list[str]:
    """Remove the directories driver add made that are empty now (deepest first)."""
    gone = []
    for path in sorted(rec.directories, key=lambda p: p.count("/"), reverse=True):
        host = root.resolve(path)
        if host is None:
            gone.append(path)
            continue
        if os.path.isdir(host) and not os.path.islink(host) and not os.listdir(host):
            os.rmdir(host)
            gone.append(path)
    rec.directories = [d for d in rec.directories if d not in gone]
    return gone


def write_record(root: MountRoot, rec: Record) -> None:
    """Write the record, or remove it when nothing is recorded; the directories driver
    add made that are empty now go."""
    made: list[str] = []
    if rec.empty():
        remove_file(root, RECORD)
        prune_dirs(root, rec)
        return
    prune_dirs(root, rec)
    where = make_dirs(root, os.path.dirname(RECORD), made=made)
    rec.directories = sorted(set(rec.directories) | set(made))
    write_file(where, os.path.basename(RECORD), rec.to_bytes())
