"""A driver repository: kernel modules and their firmware in folders by hardware model, as
MDT's "Out-of-Box Drivers" folder is laid out.

    REPOSITORY/VENDOR/MODEL/*.ko              modules for that model (any depth below it)
    REPOSITORY/VENDOR/MODEL/firmware/NAME     the firmware they name (modinfo -F firmware)
    REPOSITORY/Generic/.../*.ko               modules for every model

Modules may be plain or compressed (.ko.xz, .ko.zst, .ko.gz).  A module's firmware is
looked for in the firmware/ folder beside it, then in those of the folders above it, then
in any firmware/ folder of the repository.  The same module may sit in several folders
(models share hardware) and may come in builds for several kernels: for each kernel of an
image the build that fits it is taken (servicing.driver_kernels.misfit).

The repository is anybody's: it is walked without following symlinks that leave it
(refused, named), each file is bounded in size, a module that is not one is refused
naming its file, and the modules chosen must form no dependency loop and need no module
that neither the repository nor the kernel has (refused, naming it).
"""

from __future__ import annotations

import graphlib
import hashlib
import os
import stat
from collections.abc import Set
from dataclasses import dataclass, field

from imagefs.errors import NotFound, Refused, UsageError, one_line

from .driver_kernels import Kernel, misfit
from .driver_match import AliasTable
from .driver_modinfo import MAX_MODULE, ModuleInfo, is_module_file, read_module
from .roots import Root

MAX_FIRMWARE = 256 << 20  # bytes of one firmware file
MAX_ENTRIES = 100_000  # files and folders walked in a repository
GENERIC = "Generic"


@dataclass
class Candidate:
    """One module file of a repository."""

    path: str  # the host path
    rel: str  # its path in the repository
    info: ModuleInfo
    given: bool = False  # named with --path (not found in a repository)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def folder(self) -> str:
        """Its model folder (VENDOR/MODEL), or Generic/..., or (--path) its directory."""
        if self.given:
            return os.path.dirname(self.path)
        parts = self.rel.split("/")[:-1]
        return "/".join(parts[:2]) if parts else "."

    @property
    def shown(self) -> str:
        """How messages name it: its path in the repository, or the file given."""
        return one_line(self.path if self.given else self.rel)


@dataclass
class Repository:
    """The modules of a repository (or of the files given with --path) and its firmware."""

    root: str
    modules: list[Candidate] = field(default_factory=list)
    firmware: dict[str, list[str]] = field(default_factory=dict)  # name -> repo paths

    def exports(self) -> set[str]:
        """Every symbol the repository's modules export."""
        return {e for c in self.modules for e in c.info.exports}

    def models(self) -> list[str]:
        return sorted({c.folder for c in self.modules
                       if not c.folder.startswith(GENERIC) and "/" in c.folder})

    def for_model(self, model: str) -> list[Candidate]:
        model = model.strip("/")
        mine = [c for c in self.modules if c.folder == model]
        if not mine:
            raise Refused(f"no model folder {one_line(model)!r} with modules in the "
                          f"repository {self.root} (it has: "
                          f"{', '.join(self.models()) or 'none'})")
        return mine + [c for c in self.modules if c.folder.split("/")[0] == GENERIC]

    def aliases(self, candidates: list[Candidate]) -> AliasTable:
        """The aliases of candidates (after every module of a kernel, as depmod orders a
        module it finds outside modules.order)."""
        table = AliasTable()
        for n, c in enumerate(candidates):
            for alias in c.info.aliases:
                table.add(alias, c.name, 1_000_000 + n)
        return table

    def find_firmware(self, candidate: Candidate, name: str) -> str | None:
        """The repository path of firmware `name` for candidate: beside it, above it,
        anywhere."""
        found = self.firmware.get(name, [])
        parts = candidate.rel.split("/")[:-1]
        for depth in range(len(parts), -1, -1):
            near = "/".join([*parts[:depth], "firmware", name])
            if near in found:
                return near
        return found[0] if found else None

    def host(self, rel: str) -> str:
        return os.path.join(self.root, rel)


def scan_repository(path: str) -> Repository:
    """Every module and firmware file of the repository at path."""
    if not os.path.isdir(path):
        raise NotFound(f"{path}: no such repository folder")
    repo = Repository(os.path.realpath(path))
    seen = 0
    for top, dirs, files in os.walk(repo.root):
        seen += len(dirs) + len(files)
        if seen > MAX_ENTRIES:
            raise UsageError(f"{path}: more than {MAX_ENTRIES} files and folders; not taken "
                             "as a driver repository")
        rel_top = os.path.relpath(top, repo.root)
        for d in sorted(dirs):
            _inside(repo.root, os.path.join(top, d), path)
        dirs.sort()
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_top, name))
            if "firmware" in rel.split("/")[:-1]:
                _add_firmware(repo, rel, path)
            elif is_module_file(name):
                repo.modules.append(_candidate(repo.root, rel, path))
    return repo


def from_paths(paths: list[str], recurse: bool) -> Repository:
    """A repository of the module files given (--path KO|DIR [--recurse]); the firmware/
    folder beside a file, or in a folder, gives their firmware."""
    repo = Repository("/")
    for given in paths:
        real = os.path.realpath(given)
        if os.path.isdir(real):
            sub = scan_repository(real) if recurse else _flat(real, given)
            repo.modules += [Candidate(c.path, os.path.relpath(c.path, "/"), c.info, True)
                             for c in sub.modules]
            for name, where in sub.firmware.items():
                repo.firmware.setdefault(name, []).extend(
                    os.path.relpath(os.path.join(sub.root, w), "/") for w in where)
        elif os.path.exists(real):
            c = _candidate("/", os.path.relpath(real, "/"), given)
            repo.modules.append(Candidate(c.path, c.rel, c.info, True))
            _firmware_tree(repo, os.path.join(os.path.dirname(real), "firmware"), given)
        else:
            raise NotFound(f"{given}: no such module or folder")
    if not repo.modules:
        raise Refused(f"no kernel modules (*.ko, *.ko.xz, *.ko.zst) in {', '.join(paths)}"
                      + ("" if recurse else " (--recurse looks in subfolders)"))
    return repo


def _flat(real: str, given: str) -> Repository:
    """The modules directly in the folder real, and the firmware in its firmware/."""
    repo = Repository(real)
    for name in sorted(os.listdir(real)):
        if is_module_file(name) and not os.path.isdir(os.path.join(real, name)):
            repo.modules.append(_candidate(real, name, given))
    _firmware_tree(repo, os.path.join(real, "firmware"), given)
    return repo


def _firmware_tree(repo: Repository, folder: str, label: str) -> None:
    """Every file under folder (a firmware/ folder, if there is one) as firmware."""
    if not os.path.isdir(folder):
        return
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            host = os.path.join(top, name)
            _add_firmware(repo, os.path.relpath(host, repo.root), label,
                          os.path.relpath(host, folder))


def _inside(root: str, path: str, label: str) -> str:
    """The real path of path, refused when a symlink leads it out of root."""
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        raise Refused(f"{label}: {os.path.relpath(path, root)} is a symlink to "
                      f"{one_line(real)}, outside the repository")
    return real


def _regular(host: str, limit: int, label: str) -> bytes:
    """The bytes of the regular file host (never a FIFO or a device), at most limit."""
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UsageError(f"{label}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{label}: not a regular file")
        if st.st_size > limit:
            raise UsageError(f"{label}: {st.st_size} bytes, over the limit of {limit >> 20} "
                             "MiB")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{label}: over the limit of {limit >> 20} MiB")
    return data


def _candidate(root: str, rel: str, label: str) -> Candidate:
    host = os.path.join(root, rel)
    real = _inside(root, host, label) if root != "/" else host
    shown = one_line(rel if root != "/" else label)
    data = _regular(real, MAX_MODULE, shown)
    return Candidate(real, rel, read_module(data, shown))


def _add_firmware(repo: Repository, rel: str, label: str, name: str | None = None) -> None:
    """rel (a file of the repository) is firmware `name`: by default what follows its
    last firmware/ folder."""
    if name is None:
        parts = rel.split("/")
        at = len(parts) - 2 - parts[:-1][::-1].index("firmware")
        name = "/".join(parts[at + 1:])
    host = repo.host(rel)
    if repo.root != "/":
        host = _inside(repo.root, host, label)
    st = os.stat(host)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{label}: {one_line(rel)} is not a regular file")
    if st.st_size > MAX_FIRMWARE:
        raise UsageError(f"{label}: {one_line(rel)} is {st.st_size} bytes, over the limit "
                         f"of {MAX_FIRMWARE >> 20} MiB for firmware")
    repo.firmware.setdefault(name, []).append(rel)


def file_digest(host: str, limit: int) -> tuple[str, int]:
    """(sha256, size) of a repository file, read again (apply checks it is unchanged)."""
    data = _regular(host, limit, one_line(host))
    return hashlib.sha256(data).hexdigest(), len(data)


def builds_for(root: Root, kernel: Kernel, candidates: list[Candidate],
               prefer: list[str] | None = None, others: Set[str] = frozenset()
               ) -> dict[str, Candidate]:
    """For each module name among candidates, the build that fits kernel; refused naming
    the module and both kernels when none does, or when two different builds fit and
    neither is in a preferred folder."""
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.name, []).append(c)
    out = {}
    for name, group in groups.items():
        fitting, why = [], []
        for c in group:
            reason = misfit(root, kernel, c.info, others)
            (why.append((c, reason)) if reason else fitting.append(c))
        if not fitting:
            c, reason = why[0]
            raise Refused(f"module {name} ({c.shown}) {reason}; refused for "
                          f"kernel {kernel.release}")
        out[name] = _one(fitting, prefer or [])
    return out


def _one(fitting: list[Candidate], prefer: list[str]) -> Candidate:
    for folder in prefer:
        mine = [c for c in fitting if c.folder == folder]
        if mine:
            return mine[0]
    if len({c.info.sha256 for c in fitting}) == 1:
        return fitting[0]
    raise Refused(f"module {fitting[0].name} comes in different builds that all fit: "
                  f"{', '.join(c.shown for c in fitting)}; choose one with --model "
                  "or --path")


def with_dependencies(root: Root, kernel: Kernel, chosen: dict[str, Candidate],
                      repository: list[Candidate], prefer: list[str] | None = None,
                      others: Set[str] = frozenset()) -> list[Candidate]:
    """chosen and the repository modules they need, dependencies first; what the kernel
    has already is not taken from the repository."""
    todo = list(chosen)
    picked = dict(chosen)
    while todo:
        name = todo.pop(0)
        for dep in picked[name].info.depends:
            if dep in picked or kernel.provides(dep):
                continue
            builds = [c for c in repository if c.name == dep]
            if not builds:
                raise Refused(f"module {name} ({picked[name].shown}) needs module "
                              f"{dep}, which neither the repository nor kernel "
                              f"{kernel.release} has")
            picked[dep] = builds_for(root, kernel, builds, prefer, others)[dep]
            todo.append(dep)
    graph = {n: [d for d in c.info.depends if d in picked] for n, c in picked.items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        loop = " -> ".join(e.args[1][::-1]) if len(e.args) > 1 else "?"
        raise Refused(f"the modules depend on each other in a loop: {loop}") from None
    return [picked[n] for n in order]
