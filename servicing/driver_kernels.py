"""The kernels of a Debian root and what depmod recorded for each: lib/modules/KVER with a
kernel image (boot/vmlinuz-KVER) or modules of its own, its modules in depmod's order
(modules.dep), their aliases (modules.alias), the built-in drivers (modules.builtin and
the aliases modules.builtin.modinfo records), and whether a firmware file is where that
kernel's loader looks.

Everything is read through a servicing.roots.Root (an index read straight from the image,
or a mount), bounded, and taken as data: a release that is not a plain name is no kernel,
a malformed line is skipped.

Whether a module fits a kernel (`misfit`) is decided against the kernel's own modules:
the same ELF machine, class and byte order, vermagic naming the kernel's release with the
same flags, and, for every symbol the kernel's modules also import, the same symbol
version (CRC) in __versions: a module built against another build of the same release
has other CRCs (module_layout first of all), which is what the kernel refuses at load.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Set
from dataclasses import dataclass, field

from imagefs.errors import CorruptImage, NoSuchPath, NotADirectory, one_line

from .driver_match import AliasTable
from .driver_modinfo import ModuleInfo, NotAModule, module_name, read_module
from .roots import IndexRoot, MountRoot, Root

MODULES = "/lib/modules"
FIRMWARE = "/lib/firmware"
RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}\Z")
REFERENCE_READS = 24  # in-tree modules read at most to learn a kernel's symbol versions
MAX_INDEX_FILE = 64 << 20


@dataclass
class Reference:
    """What a kernel's own modules say about it: vermagic, ELF kind, symbol versions."""

    vermagic: str = ""
    machine: str = ""
    elfclass: int = 0
    little_endian: bool = True
    crcs: dict[str, tuple[int, str]] = field(default_factory=dict)  # sym -> (crc, module)
    read: list[str] = field(default_factory=list)


@dataclass
class Kernel:
    """One kernel of a root, as depmod left it."""

    release: str
    has_image: bool
    indexed: bool  # modules.dep is there (depmod ran)
    modules: dict[str, str] = field(default_factory=dict)  # name -> path under its dir
    depends: dict[str, list[str]] = field(default_factory=dict)
    aliases: AliasTable = field(default_factory=AliasTable)
    builtin: list[str] = field(default_factory=list)
    builtin_aliases: AliasTable = field(default_factory=AliasTable)
    firmware_suffixes: tuple[str, ...] = ("",)
    reference: Reference | None = None

    @property
    def directory(self) -> str:
        return f"{MODULES}/{self.release}"

    def where(self, name: str) -> str:
        """in-tree (kernel/), updates (updates/), out-of-tree (elsewhere), built-in."""
        path = self.modules.get(name)
        if path is None:
            return "built-in" if name in self.builtin else ""
        if path.startswith("kernel/"):
            return "in-tree"
        return "updates" if path.startswith("updates/") else "out-of-tree"

    def provides(self, name: str) -> bool:
        return name in self.modules or name in self.builtin


def find_kernels(root: Root) -> list[Kernel]:
    """Every kernel of root, by release (lib/modules/* with a kernel image or modules)."""
    found = []
    for release in sorted(root.names(MODULES) or []):
        if not RELEASE.match(release):
            continue
        inside = root.names(f"{MODULES}/{release}")
        if inside is None:
            continue
        has_image = size_of(root, f"/boot/vmlinuz-{release}") is not None
        if not (has_image or {"kernel", "modules.order", "modules.dep"} & set(inside)):
            continue
        found.append(_kernel(root, release, has_image))
    return found


def _kernel(root: Root, release: str, has_image: bool) -> Kernel:
    base = f"{MODULES}/{release}"
    dep = _text(root, f"{base}/modules.dep")
    k = Kernel(release, has_image, dep is not None)
    for line in (dep or "").splitlines():
        path, sep, deps = line.partition(":")
        if not sep or not path:
            continue
        name = module_name(path)
        k.modules.setdefault(name, path)
        k.depends.setdefault(name, [module_name(d) for d in deps.split()])
    order = {name: n for n, name in enumerate(k.modules)}
    for line in (_text(root, f"{base}/modules.alias") or "").splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            k.aliases.add(words[1], words[2], order.get(words[2], len(order)))
    k.builtin = [module_name(p) for p in (_text(root, f"{base}/modules.builtin") or "").split()]
    raw = _text(root, f"{base}/modules.builtin.modinfo") or ""
    for n, item in enumerate(raw.split("\0")):
        key, sep, value = item.partition("=")
        mod, dot, what = key.partition(".")
        if sep and dot and what == "alias":
            k.builtin_aliases.add(value, mod, n)
    k.firmware_suffixes = _firmware_suffixes(_text(root, f"/boot/config-{release}"))
    return k


def _text(root: Root, path: str) -> str | None:
    """A text file of the root as latin-1 (byte for byte, as kmod compares), or None."""
    try:
        data = root.read(path, MAX_INDEX_FILE)
    except CorruptImage:
        return None
    return None if data is None else data.decode("latin-1")


def _firmware_suffixes(config: str | None) -> tuple[str, ...]:
    """The file names the kernel's firmware loader tries: plain, and compressed where the
    kernel's config says it can (all three when the config is not there)."""
    if config is None:
        return ("", ".xz", ".zst")
    out = [""]
    if "CONFIG_FW_LOADER_COMPRESS_XZ=y" in config:
        out.append(".xz")
    if "CONFIG_FW_LOADER_COMPRESS_ZSTD=y" in config:
        out.append(".zst")
    return tuple(out)


def size_of(root: Root, path: str) -> int | None:
    """The size of the regular file at path in root (symlinks followed inside it), None
    when there is none; nothing is read."""
    if isinstance(root, IndexRoot):
        from imagefs.format import layout as F

        try:
            ino = root.view.lookup(path)
        except (NoSuchPath, NotADirectory, CorruptImage):
            return None
        return int(ino.size) if ino.kind == F.REG else None
    if isinstance(root, MountRoot):
        real = root.resolve(path)
        try:
            st = os.lstat(real) if real is not None else None
        except OSError:
            return None
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None
    try:
        data = root.read(path)
    except CorruptImage:
        return None
    return None if data is None else len(data)


def firmware_paths(kernel: Kernel, name: str) -> Iterator[str]:
    """Where the kernel's loader looks for firmware `name`, in its order."""
    for where in (f"{FIRMWARE}/updates/{kernel.release}", f"{FIRMWARE}/updates",
                  f"{FIRMWARE}/{kernel.release}", FIRMWARE):
        for suffix in kernel.firmware_suffixes:
            yield f"{where}/{name}{suffix}"


def find_firmware(root: Root, kernel: Kernel, name: str) -> str | None:
    """The path the kernel would load firmware `name` from, or None."""
    return next((p for p in firmware_paths(kernel, name) if size_of(root, p) is not None),
                None)


def kernel_module(root: Root, kernel: Kernel, name: str) -> ModuleInfo | None:
    """The metadata of the kernel's module `name` (None when it has no such file or the
    file is not a module)."""
    path = kernel.modules.get(name)
    if path is None:
        return None
    try:
        data = root.read(f"{kernel.directory}/{path}")
    except CorruptImage:
        return None
    if data is None:
        return None
    try:
        return read_module(data, f"{kernel.directory}/{path}")
    except NotAModule:
        return None


def reference(root: Root, kernel: Kernel, wanted: set[str], bus: str = "") -> Reference:
    """What the kernel's own (in-tree) modules say about it, read until every symbol in
    wanted has a version or REFERENCE_READS modules were read; modules with aliases on
    `bus` ("pci:") first, since they import the same symbols."""
    ref = kernel.reference or Reference()
    kernel.reference = ref
    if ref.vermagic and (wanted <= set(ref.crcs) or len(ref.read) >= REFERENCE_READS):
        return ref
    for name in _candidates(kernel, bus):
        if len(ref.read) >= REFERENCE_READS or (ref.vermagic and wanted <= set(ref.crcs)):
            break
        if name in ref.read:
            continue
        ref.read.append(name)
        info = kernel_module(root, kernel, name)
        if info is None:
            continue
        if not ref.vermagic:
            ref.vermagic, ref.machine = info.vermagic, info.machine
            ref.elfclass, ref.little_endian = info.elfclass, info.little_endian
        for sym, crc in info.versions.items():
            ref.crcs.setdefault(sym, (crc, name))
    return ref


def _candidates(kernel: Kernel, bus: str) -> list[str]:
    intree = [n for n, p in kernel.modules.items() if p.startswith("kernel/")]
    if not bus:
        return intree
    on_bus = {m for pattern, m, _p in kernel.aliases.entries if pattern.startswith(bus)}
    return [n for n in intree if n in on_bus] + [n for n in intree if n not in on_bus]


def misfit(root: Root, kernel: Kernel, info: ModuleInfo,
           others: Set[str] = frozenset()) -> str | None:
    """Why the module cannot be loaded by the kernel, or None when it fits.  others: the
    symbols modules added with it export (no module of the kernel knows them)."""
    bus = next((a.split(":", 1)[0] + ":" for a in info.aliases if ":" in a), "")
    ref = reference(root, kernel, set(info.versions) - set(others), bus)
    if info.release != kernel.release:
        return f"is built for kernel {one_line(info.release)}, not {kernel.release}"
    if not ref.vermagic:
        return None  # no module of the kernel to compare with: the release must do
    if (info.machine, info.elfclass, info.little_endian) != (
            ref.machine, ref.elfclass, ref.little_endian):
        return (f"is built for {info.machine} ({info.elfclass}-bit), kernel "
                f"{kernel.release}'s modules for {ref.machine} ({ref.elfclass}-bit)")
    flags = ref.vermagic.split(" ", 1)[1].strip() if " " in ref.vermagic else ""
    if info.flags != flags:
        return (f"has vermagic {one_line(info.vermagic.strip())!r}; kernel "
                f"{kernel.release}'s modules have {ref.vermagic.strip()!r}")
    for sym, crc in sorted(info.versions.items()):
        theirs = ref.crcs.get(sym)
        if theirs is not None and theirs[0] != crc:
            return (f"disagrees about the version of symbol {sym} with kernel "
                    f"{kernel.release} (0x{crc:08x}; its {theirs[1]} has "
                    f"0x{theirs[0]:08x}): built for another build of that kernel")
    return None
