"""A machine's hardware inventory: its DMI identity and every device's modalias, as
`imagefs driver inventory` writes it on the target machine and `driver check` and `driver
add --hardware` read it:

    {"dmi": {"sys_vendor": "...", "product_name": "...", "board_name": "..."},
     "modaliases": ["pci:v00008086d000015FBsv...", "acpi:LNXPWRBN:", ...]}

An inventory comes from somewhere else and is hostile input: the file is bounded, must be
a JSON object with a non-empty list of modalias strings, and each modalias must look like
one (BUS:..., printable ASCII, no glob characters, which would match aliases instead of
being matched by them).  Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import NotFound, UsageError, one_line

MAX_FILE = 4 << 20
MAX_MODALIASES = 10000
MAX_MODALIAS = 4000  # a CPU's modalias with its feature list runs to ~1500
MAX_DMI = 256
DMI_KEYS = ("sys_vendor", "product_name", "board_name")
MODALIAS = re.compile(r"[a-z0-9_]{1,32}:[\x21-\x7e]*\Z")
GLOB = set("*?[]\\")


@dataclass
class Inventory:
    """One machine: where the inventory came from, its DMI identity, its modaliases."""

    source: str
    dmi: dict[str, str] = field(default_factory=dict)
    modaliases: list[str] = field(default_factory=list)

    def identity(self) -> str:
        """"Vendor Product (board Board)", for a heading."""
        name = " ".join(v for v in (self.dmi.get("sys_vendor"), self.dmi.get("product_name"))
                        if v)
        board = self.dmi.get("board_name")
        return one_line((name or "unknown machine") + (f" (board {board})" if board else ""))

    def to_json(self) -> dict[str, Any]:
        return {"dmi": dict(self.dmi), "modaliases": list(self.modaliases)}


def load_inventory(path: str) -> Inventory:
    """The inventory in the file at path, or a one-line refusal."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such hardware inventory") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a regular file")
        data = fh.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise UsageError(f"{path}: over {MAX_FILE >> 20} MiB; not a hardware inventory")
    return parse_inventory(data, path)


def parse_inventory(data: bytes, source: str) -> Inventory:
    label = one_line(source)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UsageError(f"{label}: not a hardware inventory (not JSON)") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{label}: not a hardware inventory (a JSON object with "
                         "\"modaliases\" is expected)")
    aliases = doc.get("modaliases")
    if not isinstance(aliases, list) or not aliases:
        raise UsageError(f"{label}: no modaliases (a non-empty \"modaliases\" list of "
                         "strings is expected)")
    if len(aliases) > MAX_MODALIASES:
        raise UsageError(f"{label}: {len(aliases)} modaliases, more than {MAX_MODALIASES}")
    out = Inventory(source, _dmi(doc.get("dmi"), label))
    for n, alias in enumerate(aliases):
        check_modalias(alias, f"{label}: modaliases[{n}]")
        if alias not in out.modaliases:
            out.modaliases.append(alias)
    return out


def _dmi(value: Any, label: str) -> dict[str, str]:
    if value is None:
        return {k: "" for k in DMI_KEYS}
    if not isinstance(value, dict):
        raise UsageError(f"{label}: \"dmi\" is not an object")
    out = {}
    for key in DMI_KEYS:
        v = value.get(key, "")
        if not isinstance(v, str) or len(v) > MAX_DMI:
            raise UsageError(f"{label}: dmi.{key} is not a string of at most {MAX_DMI} "
                             "characters")
        out[key] = v
    return out


def check_modalias(alias: Any, label: str) -> str:
    """alias if it is a modalias string; a one-line refusal otherwise."""
    if not isinstance(alias, str):
        raise UsageError(f"{label} is not a string ({type(alias).__name__})")
    if len(alias) > MAX_MODALIAS:
        raise UsageError(f"{label} is {len(alias)} characters long, more than "
                         f"{MAX_MODALIAS}")
    if GLOB & set(alias):
        raise UsageError(f"{label}: {one_line(alias)[:80]!r} holds a glob character "
                         "(* ? [ ] \\): a device's modalias never does")
    if not MODALIAS.match(alias):
        raise UsageError(f"{label}: {one_line(alias)[:80]!r} is not a modalias (BUS:... in "
                         "printable ASCII, without spaces)")
    return alias


def collect_inventory(sys_root: str = "/sys") -> tuple[Inventory, list[str]]:
    """This machine's inventory from sys_root (/sys): DMI from class/dmi/id (an empty
    string where the firmware publishes none) and the modalias of every device of every
    bus.  Also the modaliases left out, with why (none on a usual machine)."""
    dmi = {}
    for key in DMI_KEYS:
        try:
            with open(os.path.join(sys_root, "class/dmi/id", key), "rb") as fh:
                dmi[key] = fh.read(MAX_DMI).decode("utf-8", "replace").strip()
        except OSError:
            dmi[key] = ""
    inv = Inventory("this machine", dmi)
    skipped = []
    for path in sorted(glob.glob(os.path.join(sys_root, "bus/*/devices/*/modalias"))):
        try:
            with open(path, "rb") as fh:
                alias = fh.read(MAX_MODALIAS + 1).decode("ascii", "replace").strip()
        except OSError:
            continue
        if not alias:
            continue
        try:
            check_modalias(alias, path)
        except UsageError as e:
            skipped.append(e.message())
            continue
        if alias not in inv.modaliases:
            inv.modaliases.append(alias)
    inv.modaliases.sort()
    return inv, skipped
