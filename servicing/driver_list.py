"""`imagefs driver list` (DISM /Get-Drivers): the out-of-box drivers of an index, each with
its version, aliases, firmware (and whether the image has it where the kernel looks) and
where it came from; with --all the kernel's own modules too.

Out-of-box is every module of a kernel that is not under its kernel/ directory (what
depmod indexed under updates/, extra/, ...) and every module the record of `driver add`
names (servicing.driver_record), which says where it came from; the others' origin is
unknown to imagefs.  Read straight from the image (or a mount), without changing it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import CorruptImage, NotFound, one_line
from imagefs.image import Image

from .driver_kernels import Kernel, find_firmware, find_kernels
from .driver_modinfo import NotAModule, read_module
from .driver_record import read_record
from .roots import IndexRoot, MountRoot, Root


@dataclass
class Driver:
    kernel: str
    name: str
    where: str  # updates, out-of-tree, in-tree, missing (recorded, file gone)
    path: str  # its file in the image
    version: str = ""
    description: str = ""
    aliases: list[str] = field(default_factory=list)
    firmware: list[dict[str, Any]] = field(default_factory=list)  # name, found
    depends: list[str] = field(default_factory=list)
    signed: bool = False
    added_by_imagefs: bool = False
    source: str = ""  # where driver add took it from
    folder: str = ""
    added: str = ""
    indexed: bool = True  # depmod knows it (modules.dep names it)
    error: str = ""  # when its file is not a module

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriverList:
    image: str | None
    index: int | None
    name: str | None
    mount: str | None
    kernels: list[str]
    drivers: list[Driver]

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "index": self.index, "name": self.name,
                "mount": self.mount, "kernels": self.kernels,
                "drivers": [d.to_json() for d in self.drivers]}


def list_drivers(root: Root, everything: bool = False) -> tuple[list[str], list[Driver]]:
    """(the kernels, their drivers): out-of-box ones, or with everything all modules."""
    kernels = find_kernels(root)
    rec = read_record(root)
    out = []
    for kernel in kernels:
        mine = {m["name"]: m for m in rec.modules if m["kernel"] == kernel.release}
        names = [n for n, p in kernel.modules.items()
                 if everything or not p.startswith("kernel/") or n in mine]
        names += [n for n in mine if n not in kernel.modules]
        for name in names:
            out.append(_driver(root, kernel, name, mine.get(name)))
    return [k.release for k in kernels], out


def _driver(root: Root, kernel: Kernel, name: str, mine: dict[str, Any] | None) -> Driver:
    path = kernel.modules.get(name) or (mine or {}).get("path", "")
    full = f"{kernel.directory}/{path}"
    d = Driver(kernel.release, name, kernel.where(name) or "updates", full,
               indexed=name in kernel.modules)
    if mine is not None:
        d.added_by_imagefs = True
        d.source, d.folder, d.added = mine["source"], mine["folder"], mine["added"]
    try:
        data = root.read(full)
    except CorruptImage as e:
        data, d.error = None, e.detail()
    if data is None:
        d.where = "missing"
        d.error = d.error or "its file is not in the image"
        return d
    try:
        info = read_module(data, full)
    except NotAModule as e:
        d.error = e.message()
        return d
    d.version, d.description = info.version, one_line(info.description)
    d.aliases, d.depends, d.signed = info.aliases, info.depends, info.signed
    d.firmware = [{"name": fw, "found": find_firmware(root, kernel, fw)}
                  for fw in info.firmware]
    return d


@contextlib.contextmanager
def index_or_mount(image: str | None, index: str | None, mount: str | None
                   ) -> Iterator[tuple[Root, dict[str, Any]]]:
    """The root to read (an index straight from the image, or a mounted directory) and
    how reports name it: image, index, name, mount."""
    if image is None:
        if mount is None or not os.path.isdir(mount):
            raise NotFound(f"{mount}: no such directory")
        mroot = MountRoot(mount)
        yield mroot, {"image": None, "index": None, "name": None, "mount": mroot.path}
        return
    with Image.open(image) as img:
        view = img.view(index if index is not None else "")
        yield IndexRoot(view), {"image": os.path.abspath(image), "index": view.number,
                                "name": view.entry.name, "mount": None}


def drivers_of(image: str | None, index: str | None, mount: str | None,
               everything: bool = False) -> DriverList:
    """`imagefs driver list` of IMAGE INDEX or of the mount MNT."""
    with index_or_mount(image, index, mount) as (root, where):
        kernels, drivers = list_drivers(root, everything)
    return DriverList(where["image"], where["index"], where["name"], where["mount"],
                      kernels, drivers)
