"""What a Linux kernel module says about itself: its .modinfo (name, vermagic, version,
aliases, firmware, depends) and symbol versions (__versions), read with pyelftools.

A module is anybody's file (a driver repository, an image): it is read from bytes already
bounded in size, decompressed with a bound (.ko.xz, .ko.zst and .ko.gz are recognised by
their magic, as kmod does), and anything that is not a relocatable ELF object with a
.modinfo section is refused with one line.  Names that become paths in an image (the
module's name, its firmware) are checked here, once: a module cannot name firmware
outside lib/firmware, nor call itself "../x".
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from imagefs.errors import NotAModule, one_line

MAX_MODULE = 256 << 20  # bytes of a module, compressed or not (the largest are ~30 MB)
SIGNATURE = b"~Module signature appended~\n"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
NAME = re.compile(r"[A-Za-z0-9_-]{1,55}\Z")  # MODULE_NAME_LEN is 56 with the NUL
MAX_FIELD = 4096  # characters of one .modinfo value we keep
MAX_FIRMWARE_NAME = 255
_XZ, _ZSTD, _GZIP = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x1f\x8b"


@dataclass
class ModuleInfo:
    """One kernel module's metadata, as `modinfo -F` and `modprobe --dump-modversions`
    would print it."""

    name: str
    vermagic: str
    version: str = ""
    description: str = ""
    srcversion: str = ""
    aliases: list[str] = field(default_factory=list)
    firmware: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)
    machine: str = ""  # ELF e_machine, as pyelftools names it: EM_X86_64
    elfclass: int = 64
    little_endian: bool = True
    versions: dict[str, int] = field(default_factory=dict)  # symbol -> CRC
    exports: list[str] = field(default_factory=list)  # EXPORT_SYMBOL names
    signed: bool = False
    compression: str = ""  # "", "xz", "zst", "gz"
    size: int = 0  # of the file as stored
    sha256: str = ""  # of the file as stored

    @property
    def release(self) -> str:
        """The kernel release the module was built for (vermagic's first word)."""
        return self.vermagic.split(" ", 1)[0]

    @property
    def flags(self) -> str:
        """The rest of vermagic (SMP preempt mod_unload modversions ...)."""
        parts = self.vermagic.split(" ", 1)
        return parts[1].strip() if len(parts) > 1 else ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["versions"] = {k: f"0x{v:08x}" for k, v in self.versions.items()}
        return out


def module_name(filename: str) -> str:
    """The module name a file name gives (what depmod calls it): the base name without
    .ko[.xz|.zst|.gz], dashes as underscores."""
    base = filename.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def is_module_file(filename: str) -> bool:
    return filename.endswith(MODULE_SUFFIXES) and not filename.startswith(".")


def read_module(data: bytes, label: str) -> ModuleInfo:
    """The metadata of the module whose file holds data (label names it in errors)."""
    raw, compression = decompress(data, label)
    info = _parse(raw, label)
    info.compression = compression
    info.signed = raw.endswith(SIGNATURE)
    info.size = len(data)
    info.sha256 = hashlib.sha256(data).hexdigest()
    return info


def decompress(data: bytes, label: str) -> tuple[bytes, str]:
    """(the module's ELF bytes, the compression it had), at most MAX_MODULE bytes."""
    try:
        if data.startswith(_XZ):
            xz = lzma.LZMADecompressor()
            return _bounded(xz.decompress(data, MAX_MODULE + 1), label), "xz"
        if data.startswith(_ZSTD):
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            return _bounded(reader.read(MAX_MODULE + 1), label), "zst"
        if data.startswith(_GZIP):
            gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return _bounded(gz.decompress(data, MAX_MODULE + 1), label), "gz"
    except (lzma.LZMAError, zlib.error, EOFError, ValueError) as e:
        raise NotAModule(f"{label}: not a kernel module: damaged compressed data "
                         f"({one_line(str(e))[:80]})") from None
    except Exception as e:  # zstandard.ZstdError
        raise NotAModule(f"{label}: not a kernel module: damaged compressed data "
                         f"({type(e).__name__})") from None
    return data, ""


def _bounded(raw: bytes, label: str) -> bytes:
    if len(raw) > MAX_MODULE:
        raise NotAModule(f"{label}: over {MAX_MODULE >> 20} MiB once decompressed; not "
                         "taken as a kernel module")
    return raw


def _parse(raw: bytes, label: str) -> ModuleInfo:
    """pyelftools reads and checks the ELF header; the section table is walked with
    struct (pyelftools builds an object per section, ~10 ms a module: listing a kernel's
    thousand modules took seconds)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if not raw.startswith(b"\x7fELF"):
        raise NotAModule(f"{label}: not a kernel module (not an ELF file)")
    try:
        elf = ELFFile(io.BytesIO(raw))
        header = elf.header
        kind, machine = str(header["e_type"]), str(header["e_machine"])
        elfclass, little = int(elf.elfclass), bool(elf.little_endian)
        table = (int(header["e_shoff"]), int(header["e_shentsize"]), int(header["e_shnum"]),
                 int(header["e_shstrndx"]))
    except (ELFError, Exception) as e:  # noqa: B014 - pyelftools raises many kinds
        raise NotAModule(f"{label}: not a kernel module (damaged or truncated ELF: "
                         f"{one_line(str(e))[:80] or type(e).__name__})") from None
    if kind != "ET_REL":
        raise NotAModule(f"{label}: not a kernel module (an ELF {kind}, not a relocatable "
                         "object)")
    sections = _sections(raw, elfclass, little, table, label)
    if ".modinfo" not in sections:
        raise NotAModule(f"{label}: not a kernel module (no .modinfo section)")
    fields = _fields(sections[".modinfo"])
    crcs = (_versions(sections["__versions"], elfclass, little)
            if "__versions" in sections else {})
    info = _info(fields, label, machine, elfclass, little, crcs)
    info.exports = [e.decode("ascii", "replace")
                    for e in sections.get("__ksymtab_strings", b"").split(b"\0") if e]
    return info


_SHDR = {64: ("IIQQQQIIQQ", 64), 32: ("IIIIIIIIII", 40)}
SHT_NOBITS = 8


def _sections(raw: bytes, elfclass: int, little: bool, table: tuple[int, int, int, int],
              label: str) -> dict[str, bytes]:
    """The bytes of the sections .modinfo, __versions and __ksymtab_strings, by walking
    the section header table (each entry checked to lie inside the file)."""
    shoff, shentsize, shnum, shstrndx = table
    fmt, size = _SHDR.get(elfclass, ("", 0))
    fmt = ("<" if little else ">") + fmt
    if (not size or shentsize != size or not 0 < shnum < 65280 or shstrndx >= shnum
            or shoff + shnum * size > len(raw)):
        raise NotAModule(f"{label}: not a kernel module (damaged or truncated ELF: its "
                         "section table lies outside the file)")
    headers = [struct.unpack_from(fmt, raw, shoff + n * size) for n in range(shnum)]

    def body(h: tuple[int, ...]) -> bytes:
        offset, length = h[4], h[5]
        if h[1] == SHT_NOBITS or offset + length > len(raw):
            raise NotAModule(f"{label}: not a kernel module (a section lies outside the "
                             "file: truncated?)")
        return raw[offset:offset + length]

    names = body(headers[shstrndx])
    out = {}
    for h in headers:
        end = names.find(b"\0", h[0])
        name = names[h[0]:end] if 0 <= h[0] < len(names) and end >= 0 else b""
        if name in (b".modinfo", b"__versions", b"__ksymtab_strings"):
            out[name.decode()] = body(h)
    return out


def _fields(data: bytes) -> list[tuple[str, str]]:
    """.modinfo's key=value strings, NUL-separated (padding NULs skipped)."""
    out = []
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out.append((key.decode("utf-8", "replace"),
                        value.decode("utf-8", "replace")[:MAX_FIELD]))
    return out


def _versions(data: bytes, elfclass: int, little: bool) -> dict[str, int]:
    """__versions: struct modversion_info {unsigned long crc; char name[64 - sizeof(long)]}
    in the module's word size and byte order."""
    word = elfclass // 8
    size = 64
    order: Literal["little", "big"] = "little" if little else "big"
    out: dict[str, int] = {}
    for at in range(0, len(data) - size + 1, size):
        crc = int.from_bytes(data[at:at + word], order)
        name = data[at + word:at + size].split(b"\0", 1)[0].decode("ascii", "replace")
        if name:
            out[name] = crc & 0xFFFFFFFF
    return out


def _info(fields: list[tuple[str, str]], label: str, machine: str, elfclass: int,
          little: bool, crcs: dict[str, int]) -> ModuleInfo:
    one = {k: v for k, v in reversed(fields)}  # the first value of each key
    many: dict[str, list[str]] = {}
    for k, v in fields:
        many.setdefault(k, []).append(v)
    if "vermagic" not in one:
        raise NotAModule(f"{label}: not a kernel module (its .modinfo has no vermagic)")
    name = one.get("name") or module_name(label)
    if not NAME.match(name):
        raise NotAModule(f"{label}: the module calls itself {one_line(name)[:60]!r}, not a "
                         "module name (letters, digits, '_', '-')")
    depends = [d.replace("-", "_") for d in one.get("depends", "").split(",") if d]
    for dep in depends:
        if not NAME.match(dep):
            raise NotAModule(f"{label}: depends on {one_line(dep)[:60]!r}, not a module name")
    firmware = many.get("firmware", [])
    for fw in firmware:
        check_firmware_name(fw, label)
    return ModuleInfo(
        name=name.replace("-", "_"), vermagic=one["vermagic"], version=one.get("version", ""),
        description=one.get("description", ""), srcversion=one.get("srcversion", ""),
        aliases=many.get("alias", []), firmware=firmware, depends=depends,
        machine=machine, elfclass=elfclass, little_endian=little, versions=crcs)


def check_firmware_name(name: str, label: str) -> str:
    """A firmware name is a relative path under lib/firmware: no '..', no control
    characters, not absolute."""
    parts = name.split("/")
    if (not name or len(name) > MAX_FIRMWARE_NAME or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 0x21 or ord(c) == 0x7F for c in name)):
        raise NotAModule(f"{label}: names firmware {one_line(name)[:80]!r}, not a path "
                         "under lib/firmware")
    return name
