"""`imagefs driver remove` (DISM /Remove-Driver): take modules that `driver add` put in an
index back out, with the firmware no other added module needs, then run the image's own
depmod for each kernel concerned and check with its modinfo that the module is no longer
found there (a kernel module of the same name, hidden until then, is found again).

Only what the record of added drivers names is removed (servicing.driver_record): a
kernel's own module, or one another tool put under updates/, is refused by name; so is a
module another added module still depends on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import Refused, one_line

from .driver_kernels import find_kernels
from .driver_modinfo import NAME
from .driver_record import Record, read_record, remove_file, write_record
from .drivers import depmod_and_check, need_tool, rebuild_initramfs
from .roots import MountRoot, Root
from .transaction import Progress, Target


@dataclass
class RemovePlan:
    modules: list[dict[str, str]] = field(default_factory=list)  # kernel, name, path
    firmware: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # depmod runs for these
    initramfs: bool = False

    def empty(self) -> bool:
        return not self.modules

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return ([f"remove module {m['name']} for kernel {m['kernel']} "
                 f"(/lib/modules/{m['kernel']}/{m['path']})" for m in self.modules]
                + [f"remove firmware {one_line(f)} (no other added module needs it)"
                   for f in self.firmware]
                + [f"run depmod {k}" for k in self.kernels]
                + [f"rebuild the initramfs of {k}" for k in self.kernels if self.initramfs])


class DriverRemove:
    """`imagefs driver remove NAME...`."""

    verb = "driver remove"

    def __init__(self, names: Sequence[str], initramfs: bool = False) -> None:
        self.initramfs = initramfs
        self.names = []
        for name in names:
            if not NAME.match(name):
                raise Refused(f"{one_line(name)[:60]!r} is not a module name")
            self.names.append(name.replace("-", "_"))
        if not self.names:
            raise Refused("name the drivers to remove (imagefs driver list shows them)")

    def arguments(self) -> dict[str, Any]:
        return {"names": self.names, "initramfs": self.initramfs}

    def plan(self, root: Root) -> RemovePlan:
        rec = read_record(root)
        need_tool(root, "depmod", "depmod must index the modules left")
        if self.initramfs:
            need_tool(root, "update-initramfs", "--initramfs rebuilds the initramfs with it")
        plan = RemovePlan(initramfs=self.initramfs)
        for name in self.names:
            mine = [m for m in rec.modules if m["name"] == name]
            if not mine:
                raise Refused(_not_added(root, name))
            plan.modules += [{"kernel": m["kernel"], "name": name, "path": m["path"]}
                             for m in mine]
        gone = {f"{m['kernel']}/{m['name']}" for m in plan.modules}
        for m in rec.modules:
            for dep in m["depends"]:
                if f"{m['kernel']}/{dep}" in gone and f"{m['kernel']}/{m['name']}" not in gone:
                    raise Refused(f"module {dep} is needed by {m['name']} (kernel "
                                  f"{m['kernel']}), which was added too: remove both")
        plan.firmware = [f["name"] for f in rec.firmware if set(f["needed_by"]) <= gone]
        present = {k.release for k in find_kernels(root)}
        plan.kernels = sorted({m["kernel"] for m in plan.modules} & present)
        return plan

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        mroot = MountRoot(target.root)
        rec = read_record(mroot)
        gone = {f"{m['kernel']}/{m['name']}" for m in plan.modules}
        for m in plan.modules:
            progress.step(f"removing module {m['name']} for kernel {m['kernel']}")
            remove_file(mroot, f"/lib/modules/{m['kernel']}/{m['path']}")
        for name in plan.firmware:
            remove_file(mroot, f"/lib/firmware/{name}")
        _forget(rec, gone, plan.firmware)
        write_record(mroot, rec)
        for kernel in plan.kernels:
            progress.step(f"running depmod {kernel}")
            mods = [m for m in plan.modules if m["kernel"] == kernel]
            depmod_and_check(target.root, kernel, "remove", [m["name"] for m in mods],
                              {m["name"]: f"/lib/modules/{kernel}/{m['path']}" for m in mods})
        if plan.initramfs:
            rebuild_initramfs(target.root, plan.kernels, progress)
        return {"removed": plan.modules, "firmware": plan.firmware,
                "initramfs": plan.initramfs}


def _forget(rec: Record, gone: set[str], firmware: list[str]) -> None:
    rec.modules = [m for m in rec.modules if f"{m['kernel']}/{m['name']}" not in gone]
    rec.firmware = [f for f in rec.firmware if f["name"] not in firmware]
    for f in rec.firmware:
        f["needed_by"] = [n for n in f["needed_by"] if n not in gone]


def _not_added(root: Root, name: str) -> str:
    """Why name cannot be removed: whose module it is, or that there is none."""
    for kernel in find_kernels(root):
        path = kernel.modules.get(name)
        if path is not None and path.startswith("kernel/"):
            return (f"module {name} is part of kernel {kernel.release} (/lib/modules/"
                    f"{kernel.release}/{one_line(path)}); driver remove takes out only what "
                    "driver add added")
        if path is not None:
            return (f"module {name} at /lib/modules/{kernel.release}/{one_line(path)} was "
                    "not added by imagefs driver add; remove it with what put it there")
        if name in kernel.builtin:
            return f"module {name} is built into kernel {kernel.release}"
    return f"no added driver {name} in the index (imagefs driver list shows them)"
