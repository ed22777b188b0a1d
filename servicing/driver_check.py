"""Will this image drive this machine?  `imagefs driver check`: for each hardware
inventory, each kernel of the index and each device, which module would bind (what
`modprobe -R MODALIAS` names in the image: in-tree, added under updates/, or built in),
which firmware files that module names and whether the image has them where the kernel
looks, and, with a repository, which of its modules would cover the device (built for
that kernel, with its firmware).

Read straight from the image (or a mount): nothing is mounted or changed.  A device with
no driver, or a driver whose firmware is missing, makes the report not ok (exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imagefs.errors import Refused, UsageError

from .driver_inventory import Inventory
from .driver_kernels import Kernel, find_firmware, find_kernels, kernel_module, misfit
from .driver_match import AliasTable, lookup
from .driver_repository import Candidate, Repository
from .roots import Root


@dataclass
class Binding:
    """A module that would bind a device, and its firmware: name -> where it is (None:
    missing)."""

    name: str
    where: str  # in-tree, updates, out-of-tree, built-in, repository
    path: str
    firmware: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "path": self.path,
                "firmware": [{"name": k, "found": v} for k, v in self.firmware.items()]}


@dataclass
class Device:
    modalias: str
    modules: list[Binding] = field(default_factory=list)  # in the image
    repository: list[Binding] = field(default_factory=list)  # would cover it
    unfit: list[str] = field(default_factory=list)  # repository modules that do not fit

    @property
    def covered(self) -> bool:
        return bool(self.modules)

    @property
    def missing_firmware(self) -> list[str]:
        return [n for b in self.modules for n, v in b.firmware.items() if v is None]

    def names(self, with_repository: bool = False) -> list[str]:
        out = [b.name for b in self.modules]
        if with_repository:
            out += [b.name for b in self.repository if b.name not in out]
        return out

    def to_json(self) -> dict[str, Any]:
        return {"modalias": self.modalias, "covered": self.covered,
                "modules": [b.to_json() for b in self.modules],
                "missing_firmware": self.missing_firmware,
                "repository": [b.to_json() for b in self.repository],
                "repository_unfit": self.unfit,
                "with_repository": self.names(True)}


@dataclass
class KernelCoverage:
    release: str
    devices: list[Device]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        devices = self.devices
        return {"release": self.release, "devices": [d.to_json() for d in devices],
                "total": len(devices), "covered": sum(d.covered for d in devices),
                "covered_with_repository": sum(bool(d.names(True)) for d in devices),
                "missing_firmware": sum(bool(d.missing_firmware) for d in devices),
                "notes": self.notes}


@dataclass
class InventoryCoverage:
    inventory: Inventory
    kernels: list[KernelCoverage]

    def to_json(self) -> dict[str, Any]:
        return {"hardware": self.inventory.source, "dmi": self.inventory.dmi,
                "identity": self.inventory.identity(),
                "kernels": [k.to_json() for k in self.kernels]}


@dataclass
class CoverageReport:
    image: str | None
    index: int | None
    name: str | None
    mount: str | None
    repository: str | None
    inventories: list[InventoryCoverage]

    @property
    def ok(self) -> bool:
        return all(d.covered and not d.missing_firmware for i in self.inventories
                   for k in i.kernels for d in k.devices)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "index": self.index, "name": self.name,
                "mount": self.mount, "repository": self.repository, "ok": self.ok,
                "inventories": [i.to_json() for i in self.inventories]}


def check_coverage(root: Root, inventories: list[Inventory],
                   repository: Repository | None) -> list[InventoryCoverage]:
    kernels = find_kernels(root)
    if not kernels:
        raise Refused(f"{root.label}: no kernel (nothing under /lib/modules with a kernel "
                      "image or modules): nothing in it drives any device")
    out = [InventoryCoverage(inv, []) for inv in inventories]
    for kernel in kernels:
        checker = _Checker(root, kernel, repository)
        for item in out:
            item.kernels.append(checker.coverage(item.inventory))
    return out


class _Checker:
    """The coverage of inventories by one kernel (and a repository)."""

    def __init__(self, root: Root, kernel: Kernel, repository: Repository | None) -> None:
        self.root, self.kernel, self.repo = root, kernel, repository
        self.infos: dict[str, dict[str, str | None]] = {}
        self.fitting: dict[str, Candidate] = {}
        self.unfit: dict[str, str] = {}
        self.repo_aliases = AliasTable()
        if repository is not None:
            self._sort(repository)

    def _sort(self, repository: Repository) -> None:
        others = repository.exports()
        for c in repository.modules:
            if c.name in self.fitting:
                continue
            reason = misfit(self.root, self.kernel, c.info, others)
            if reason is None:
                self.fitting[c.name] = c
                self.unfit.pop(c.name, None)
            else:
                self.unfit.setdefault(c.name, f"{c.name} ({c.shown}) {reason}")
        self.repo_aliases = repository.aliases(list(self.fitting.values()))
        self.unfit_aliases = repository.aliases(
            [c for c in repository.modules if c.name in self.unfit])

    def coverage(self, inv: Inventory) -> KernelCoverage:
        k = self.kernel
        devices = []
        for alias in inv.modaliases:
            dev = Device(alias)
            names, builtin = lookup(alias, k.aliases, k.builtin_aliases)
            for name in names:
                where = "built-in" if builtin else k.where(name)
                dev.modules.append(Binding(name, where, k.modules.get(name, ""),
                                           self._firmware(name)))
            if self.repo is not None:
                for name in self.repo_aliases.resolve(alias):
                    dev.repository.append(self._offer(self.fitting[name]))
                dev.unfit = [self.unfit[n] for n in self.unfit_aliases.resolve(alias)]
            devices.append(dev)
        return KernelCoverage(k.release, devices, self._notes(devices))

    def _firmware(self, name: str) -> dict[str, str | None]:
        if name not in self.infos:
            info = kernel_module(self.root, self.kernel, name)
            self.infos[name] = {fw: find_firmware(self.root, self.kernel, fw)
                                for fw in (info.firmware if info else [])}
        return self.infos[name]

    def _offer(self, c: Candidate) -> Binding:
        assert self.repo is not None
        fw: dict[str, str | None] = {}
        for name in c.info.firmware:
            fw[name] = (find_firmware(self.root, self.kernel, name)
                        or self.repo.find_firmware(c, name))
        return Binding(c.name, "repository", c.shown, fw)

    def _notes(self, devices: list[Device]) -> list[str]:
        k = self.kernel
        notes = []
        if not k.indexed:
            notes.append(f"depmod never ran for {k.release} (no modules.dep): modprobe "
                         "finds no module by alias; `imagefs driver add` runs depmod")
        if k.builtin and any(not d.covered for d in devices):
            notes.append(f"{len(k.builtin)} drivers are built into {k.release}; a built-in "
                         "driver is found only by the aliases modules.builtin.modinfo "
                         "records (Linux 6.1 records none for devices), so a device it "
                         "drives shows as without a driver")
        return notes


def check(image: str | None, index: str | None, mount: str | None, hardware: list[str],
          repository: str | None = None) -> CoverageReport:
    """`imagefs driver check` of IMAGE INDEX (read without mounting) or of the mount MNT,
    for the inventories in the files hardware, and a repository's offers."""
    from .driver_inventory import load_inventory
    from .driver_list import index_or_mount
    from .driver_repository import scan_repository

    if not hardware:
        raise UsageError("give the hardware inventories to check: --hardware FILE...")
    inventories = [load_inventory(h) for h in hardware]
    repo = scan_repository(repository) if repository is not None else None
    with index_or_mount(image, index, mount) as (root, where):
        found = check_coverage(root, inventories, repo)
    return CoverageReport(where["image"], where["index"], where["name"], where["mount"],
                          repo.root if repo is not None else None, found)
