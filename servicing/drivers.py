"""Out-of-box drivers (MDT's "Out-of-Box Drivers", DISM /Add-Driver /Remove-Driver): kernel
modules and their firmware added to an image offline, as servicing transactions.

`DriverAdd` picks modules from a driver repository (servicing.driver_repository) by a
machine's hardware inventory (its modaliases matched to the modules' aliases), by model
folder, or all of them, or takes the module files given (--path); for each kernel of the
index it takes the build that fits that kernel (vermagic, ELF machine, symbol versions:
servicing.driver_kernels.misfit) and refuses, naming both kernels, when none does; it
brings along the modules they depend on (refused, naming the missing one, when neither
the repository nor the kernel has it) and the firmware they name.  It installs them under
lib/modules/KVER/updates/imagefs/ (compressed modules decompressed: every kmod reads a
plain .ko) and lib/firmware/, records them (servicing.driver_record), then runs the
image's own depmod for each kernel in its container and checks with the image's own
modprobe that each module now resolves to its updates/ copy; with --initramfs the image's
update-initramfs rebuilds the kernel's initramfs.

`DriverRemove` takes added modules back out, with the firmware no other added module
needs, and refuses a module another added module depends on.

Why the image's own depmod in its container, not the host's `depmod -b MNT`: the host's
runs as root on the host reading the image (hostile data) and writing where the image's
symlinks say (an absolute lib -> /lib symlink would have it write the host's own
modules.dep); the image's runs confined to the image, and writes the index format of the
kmod that will read it at boot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imagefs.errors import Refused, ServicingFailed, UsageError, one_line

from .driver_inventory import Inventory, load_inventory
from .driver_kernels import Kernel, find_firmware, find_kernels, size_of
from .driver_modinfo import MAX_MODULE, decompress
from .driver_record import (
    UPDATES,
    Record,
    now,
    read_record,
    write_record,
)
from .driver_repository import (
    MAX_FIRMWARE,
    Candidate,
    Repository,
    builds_for,
    file_digest,
    from_paths,
    scan_repository,
    with_dependencies,
)
from .roots import MountRoot, Root, make_dirs, write_file
from .runner import run
from .transaction import Progress, Target

DEPMOD_TIMEOUT = 600.0
INITRAMFS_TIMEOUT = 1800.0
TOOLS = {"depmod": ("/usr/sbin/depmod", "/sbin/depmod"),
         "update-initramfs": ("/usr/sbin/update-initramfs", "/sbin/update-initramfs")}
# depmod for kernel $1, then for each module after it what the image's modprobe (add) or
# modinfo (remove) says of it, each after a \036NAME line; \037RC after depmod.
CHECK_SCRIPT = ('k=$1; how=$2; shift 2; depmod "$k" 2>&1; rc=$?; printf \'\\037%d\\n\' "$rc"; '
                '[ "$rc" = 0 ] || exit "$rc"; for m in "$@"; do printf \'\\036%s\\n\' "$m"; '
                'if [ "$how" = add ]; then modprobe -S "$k" --show-depends "$m" 2>&1; '
                'else modinfo -k "$k" -F filename "$m" 2>&1; fi; done; exit 0')


@dataclass
class Selection:
    """Which modules `driver add` takes: from repository by hardware inventories, by a
    model folder, or all; or the module files and folders in paths."""

    repository: str | None = None
    hardware: list[str] = field(default_factory=list)
    model: str | None = None
    all: bool = False
    paths: list[str] = field(default_factory=list)
    recurse: bool = False

    def check(self) -> Selection:
        ways = sum([bool(self.hardware), self.model is not None, self.all])
        if self.paths:
            if self.repository is not None or ways:
                raise UsageError("--path takes module files or folders by themselves: "
                                 "leave out --repository, --hardware, --model and --all")
        elif self.repository is None:
            raise UsageError("give --repository DIR (with --hardware FILE, --model "
                             "VENDOR/MODEL or --all) or --path KO|DIR")
        elif ways != 1:
            raise UsageError("with --repository give one of --hardware FILE, --model "
                             "VENDOR/MODEL and --all")
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModulePlan:
    kernel: str
    name: str
    version: str
    source: str  # host path of the module file
    rel: str  # its path in the repository
    folder: str
    sha256: str
    dest: str  # under lib/modules/KVER
    action: str  # add, replace, same
    overrides: str = ""  # the kernel's own module of that name, which updates/ hides
    depends: list[str] = field(default_factory=list)
    firmware: list[str] = field(default_factory=list)
    vermagic: str = ""
    signed: bool = False


@dataclass
class FirmwarePlan:
    name: str
    action: str  # add, present, missing
    source: str = ""  # host path
    sha256: str = ""
    size: int = 0
    found: str = ""  # where the index has it (present)
    needed_by: list[str] = field(default_factory=list)  # KVER/module


@dataclass
class AddPlan:
    modules: list[ModulePlan]
    firmware: list[FirmwarePlan]
    kernels: list[str]
    initramfs: bool = False
    note: str = ""  # why there is nothing to do

    def empty(self) -> bool:
        if not self.modules:
            return True
        return (all(m.action == "same" for m in self.modules)
                and not any(f.action == "add" for f in self.firmware) and not self.initramfs)

    def to_json(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "modules": [asdict(m) for m in self.modules],
                "firmware": [asdict(f) for f in self.firmware], "initramfs": self.initramfs,
                "note": self.note}

    def lines(self) -> list[str]:
        out = [self.note] if self.note else []
        for m in self.modules:
            what = {"add": "add", "replace": "replace", "same": "keep (already added)"}
            out.append(f"{what[m.action]} module {m.name} {m.version} for kernel {m.kernel} "
                       f"from {one_line(m.rel)} -> /lib/modules/{m.kernel}/{m.dest}"
                       + (f" (hides the kernel's {m.overrides})" if m.overrides else "")
                       + ("" if m.signed else " [unsigned]"))
        for f in self.firmware:
            if f.action == "add":
                out.append(f"add firmware {one_line(f.name)} ({f.size} bytes) -> "
                           f"/lib/firmware/{one_line(f.name)}")
            elif f.action == "missing":
                out.append(f"firmware {one_line(f.name)} is missing (neither in the "
                           "repository nor in the index)")
        if not self.empty():
            out += [f"run depmod {k}" for k in self.kernels]
            out += [f"rebuild the initramfs of {k}" for k in self.kernels if self.initramfs]
        return out


def need_tool(root: Root, tool: str, why: str) -> str:
    """The path of one of the image's programs, or a refusal saying what it is for."""
    for path in TOOLS[tool]:
        if size_of(root, path) is not None:
            return path
    package = "kmod" if tool == "depmod" else "initramfs-tools"
    raise Refused(f"the image has no {tool} ({package}): {why}")


def index_kernels(root: Root) -> list[Kernel]:
    kernels = find_kernels(root)
    if not kernels:
        raise Refused("no kernel in the index (nothing under /lib/modules with a kernel "
                      "image or modules)")
    return kernels


class DriverAdd:
    """`imagefs driver add`."""

    verb = "driver add"

    def __init__(self, selection: Selection, initramfs: bool = False,
                 missing_firmware_ok: bool = False) -> None:
        self.selection = selection.check()
        self.initramfs = initramfs
        self.missing_ok = missing_firmware_ok
        s = self.selection
        self.inventories: list[Inventory] = [load_inventory(h) for h in s.hardware]
        self.repo: Repository = (from_paths(s.paths, s.recurse) if s.paths
                                 else scan_repository(s.repository or ""))

    def arguments(self) -> dict[str, Any]:
        return {**self.selection.to_json(), "initramfs": self.initramfs,
                "missing_firmware_ok": self.missing_ok}

    def plan(self, root: Root) -> AddPlan:
        kernels = index_kernels(root)
        need_tool(root, "depmod", "depmod must index the added modules")
        if self.initramfs:
            need_tool(root, "update-initramfs", "--initramfs rebuilds the initramfs with it")
        rec = read_record(root)
        plan = AddPlan([], [], [k.release for k in kernels], self.initramfs)
        firmware: dict[str, FirmwarePlan] = {}
        for kernel in kernels:
            for c in self._modules(root, kernel):
                plan.modules.append(_module_plan(root, kernel, rec, c))
                for name in c.info.firmware:
                    self._firmware(root, kernel, c, name, firmware)
        plan.firmware = list(firmware.values())
        missing = [f.name for f in plan.firmware if f.action == "missing"]
        if missing and not self.missing_ok:
            raise Refused(f"firmware {', '.join(one_line(m) for m in missing)} is neither in "
                          "the repository nor in the index (--missing-firmware-ok adds the "
                          "modules anyway)")
        if not plan.modules:
            plan.note = ("no module of the repository matches a device of the inventories "
                         "(nothing to add)")
        return plan

    def _modules(self, root: Root, kernel: Kernel) -> list[Candidate]:
        """The modules to add for kernel, dependencies first."""
        s, repo = self.selection, self.repo
        prefer: list[str] = []
        if s.model is not None:
            wanted = repo.for_model(s.model)
            prefer = [s.model.strip("/")]
        elif self.inventories:
            wanted, prefer = self._matching()
        else:
            wanted = repo.modules
        others = repo.exports()
        chosen = builds_for(root, kernel, wanted, prefer, others)
        return with_dependencies(root, kernel, chosen, repo.modules, prefer, others)

    def _matching(self) -> tuple[list[Candidate], list[str]]:
        """The repository's modules whose aliases match a device of the inventories, and
        the model folders by how many of the devices they match (most first)."""
        table = self.repo.aliases(self.repo.modules)
        names: set[str] = set()
        score: dict[str, int] = {}
        for inv in self.inventories:
            for alias in inv.modaliases:
                found = table.resolve(alias)
                names.update(found)
                for c in self.repo.modules:
                    if c.name in found:
                        score[c.folder] = score.get(c.folder, 0) + 1
        prefer = sorted(score, key=lambda f: (-score[f], f))
        return [c for c in self.repo.modules if c.name in names], prefer

    def _firmware(self, root: Root, kernel: Kernel, c: Candidate, name: str,
                  found: dict[str, FirmwarePlan]) -> None:
        item = found.setdefault(name, FirmwarePlan(name, "missing"))
        item.needed_by.append(f"{kernel.release}/{c.name}")
        if item.action == "add":
            return
        there = find_firmware(root, kernel, name)
        if there is not None:
            item.action, item.found = "present", there
            return
        rel = self.repo.find_firmware(c, name)
        if rel is not None:
            item.source = self.repo.host(rel)
            item.sha256, item.size = file_digest(item.source, MAX_FIRMWARE)
            item.action = "add"

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        mroot = MountRoot(target.root)
        rec = read_record(mroot)
        made: list[str] = []
        for m in plan.modules:
            if m.action != "same":
                progress.step(f"adding module {m.name} for kernel {m.kernel}")
                _install_module(mroot, m, rec, made)
        for f in plan.firmware:
            _record_firmware(mroot, f, rec, made)
        rec.directories = sorted(set(rec.directories) | set(made))
        write_record(mroot, rec)
        for kernel in plan.kernels:
            progress.step(f"running depmod {kernel}")
            names = [m.name for m in plan.modules if m.kernel == kernel]
            depmod_and_check(target.root, kernel, "add", names, {
                m.name: f"/lib/modules/{kernel}/{m.dest}" for m in plan.modules
                if m.kernel == kernel})
        if plan.initramfs:
            rebuild_initramfs(target.root, plan.kernels, progress)
        return {"modules": [{"kernel": m.kernel, "name": m.name, "version": m.version,
                             "path": f"/lib/modules/{m.kernel}/{m.dest}", "action": m.action,
                             "source": m.rel} for m in plan.modules],
                "firmware": [{"name": f.name, "action": f.action} for f in plan.firmware],
                "initramfs": plan.initramfs}


def _module_plan(root: Root, kernel: Kernel, rec: Record, c: Candidate) -> ModulePlan:
    dest = f"{UPDATES}/{c.name}.ko"
    mine = rec.module(kernel.release, c.name)
    path = kernel.modules.get(c.name, "")
    if path and not path.startswith("kernel/") and (mine is None or path != mine["path"]):
        raise Refused(f"module {c.name} is already in the index at /lib/modules/"
                      f"{kernel.release}/{one_line(path)}, not added by imagefs (remove it "
                      "with the package or tool that put it there)")
    here = size_of(root, f"/lib/modules/{kernel.release}/{dest}") is not None
    action = "add"
    if mine is not None and here:
        action = "same" if mine["sha256"] == c.info.sha256 else "replace"
    return ModulePlan(kernel.release, c.name, c.info.version, c.path, c.shown, c.folder,
                      c.info.sha256, dest, action,
                      path if path.startswith("kernel/") else "", list(c.info.depends),
                      list(c.info.firmware), c.info.vermagic, c.info.signed)


def _source(path: str, sha256: str, limit: int) -> bytes:
    """A source file's bytes, as they were when the plan was made."""
    import hashlib

    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise ServicingFailed(f"{path}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ServicingFailed(f"{path} changed since the plan was made")
    return data


def _install_module(mroot: MountRoot, m: ModulePlan, rec: Record, made: list[str]) -> None:
    data = _source(m.source, m.sha256, MAX_MODULE)
    raw, _compression = decompress(data, m.source)
    where = make_dirs(mroot, f"/lib/modules/{m.kernel}/{os.path.dirname(m.dest)}",
                      made=made)
    write_file(where, os.path.basename(m.dest), raw)
    rec.modules = [e for e in rec.modules if (e["kernel"], e["name"]) != (m.kernel, m.name)]
    rec.modules.append({"kernel": m.kernel, "name": m.name, "path": m.dest,
                        "sha256": m.sha256, "size": len(raw), "version": m.version,
                        "vermagic": m.vermagic, "depends": m.depends,
                        "firmware": m.firmware, "source": m.source, "folder": m.folder,
                        "added": now()})


def _record_firmware(mroot: MountRoot, f: FirmwarePlan, rec: Record, made: list[str]) -> None:
    """Install firmware the plan adds; note which added modules need firmware that is
    ours (added by an earlier driver add)."""
    entry = rec.firmware_entry(f.name)
    if f.action == "add":
        data = _source(f.source, f.sha256, MAX_FIRMWARE)
        where = make_dirs(mroot, os.path.dirname(f"/lib/firmware/{f.name}"), made=made)
        write_file(where, os.path.basename(f.name), data)
        if entry is None:
            entry = {"name": f.name, "sha256": f.sha256, "size": f.size,
                     "source": f.source, "needed_by": []}
            rec.firmware.append(entry)
    if entry is not None:
        entry["needed_by"] = sorted(set(entry["needed_by"]) | set(f.needed_by))


def container_check(root: str, kernel: str, how: str, names: Sequence[str]) -> dict[str, str]:
    """depmod KVER in the image's container, then what its modprobe --show-depends (how
    "add") or modinfo -F filename ("remove") says of each module: name -> output."""
    done = run(root, ["/bin/sh", "-c", CHECK_SCRIPT, "sh", kernel, how, *names],
               timeout=DEPMOD_TIMEOUT)
    text = done.stdout.decode("utf-8", "replace")
    head, _sep, rest = text.partition("\x1f")
    code, _nl, rest = rest.partition("\n")
    if done.returncode != 0 or code.strip() != "0":
        raise ServicingFailed(f"depmod {kernel} failed in the image (exit code "
                              f"{code.strip() or done.returncode})",
                              head + done.stderr.decode("utf-8", "replace"))
    out = {}
    for part in rest.split("\x1e")[1:]:
        name, _nl, said = part.partition("\n")
        out[name] = said
    return out


def depmod_and_check(root: str, kernel: str, how: str, names: list[str],
                      paths: dict[str, str]) -> None:
    said = container_check(root, kernel, how, names)
    for name in names:
        text = said.get(name, "")
        if how == "add" and f"insmod {paths[name]}" not in text:
            raise ServicingFailed(f"after depmod {kernel}, the image's modprobe does not "
                                  f"load {name} from {paths[name]}", text)
        if how == "remove" and paths[name] in text:
            raise ServicingFailed(f"after depmod {kernel}, the image's modinfo still finds "
                                  f"{name} at {paths[name]}", text)


# initramfs-tools copies modules by its MODULES= policy, which only looks under kernel/:
# this hook brings every module imagefs added (updates/imagefs, read at build time, so a
# later driver remove takes them out again) with the firmware and dependencies they need.
INITRAMFS_HOOK = "/etc/initramfs-tools/hooks/imagefs-drivers"
INITRAMFS_HOOK_TEXT = f"""#!/bin/sh
# Written by imagefs driver add --initramfs: the drivers it added go into the initramfs.
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for ko in "${{MODULESDIR}}/{UPDATES}"/*.ko*; do
	[ -e "$ko" ] || continue
	name=${{ko##*/}}
	manual_add_modules "${{name%%.ko*}}"
done
"""


def rebuild_initramfs(root: str, kernels: Sequence[str], progress: Progress) -> None:
    """The image's update-initramfs for each kernel, in its container, with the hook that
    brings the added drivers along (written once, before the first)."""
    hooks = make_dirs(MountRoot(root), os.path.dirname(INITRAMFS_HOOK))
    write_file(hooks, os.path.basename(INITRAMFS_HOOK), INITRAMFS_HOOK_TEXT.encode(), 0o755)
    for kernel in kernels:
        progress.step(f"rebuilding the initramfs of {kernel}")
        done = run(root, ["update-initramfs", "-u", "-k", kernel], timeout=INITRAMFS_TIMEOUT)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode("utf-8", "replace")
            raise ServicingFailed(f"update-initramfs -u -k {kernel} failed in the image "
                                  f"(exit code {done.returncode})", out)
