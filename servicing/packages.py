"""The Debian packages of an index, read from its own dpkg database without mounting it.

`imagefs package list` answers from /var/lib/dpkg/status in the image (and the journal
dpkg keeps beside it in updates/, which dpkg-query applies too), parsed with python-debian,
so it costs a few chunk reads instead of a mount.  The listing is what
`dpkg-query --admindir=MNT/var/lib/dpkg -W` prints on a mount of the same index: the same
packages, names qualified with their architecture in the same cases (tests keep the two
equal, with dpkg-query as the oracle).

The database is the image's, which is to say anybody's: its size is bounded, every stanza
without a name is skipped, and whatever else it holds is text that is only shown.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

from debian.deb822 import Deb822

from imagefs.errors import CorruptImage, NoSuchPath, NotADirectory, UsageError
from imagefs.format import layout as F
from imagefs.format.view import IndexView
from imagefs.image import Image

ADMINDIR = "/var/lib/dpkg"
MAX_DATABASE = 256 << 20  # bytes of status (and of each journal entry) read at most
STATES = ("not-installed", "config-files", "half-installed", "unpacked", "half-configured",
          "triggers-awaited", "triggers-pending", "installed")


@dataclass(frozen=True)
class Package:
    """One package as the dpkg database records it."""

    name: str
    version: str
    architecture: str
    multi_arch: str
    want: str  # install, hold, deinstall, purge, unknown
    state: str  # one of STATES

    def qualified_name(self, native: str) -> str:
        """dpkg's ${binary:Package}: the name, with :ARCH when another architecture's
        package of that name could be installed beside it (Multi-Arch: same) or when the
        package is of a foreign architecture."""
        if self.multi_arch == "same" or self.architecture not in (native, "all", ""):
            return f"{self.name}:{self.architecture}"
        return self.name

    def to_json(self, native: str) -> dict[str, str]:
        return {**asdict(self), "package": self.qualified_name(native)}


@dataclass
class PackageList:
    """The packages of one index, and the architecture its dpkg calls native."""

    image: str
    index: int
    name: str
    native: str
    packages: list[Package]

    def to_json(self) -> dict[str, object]:
        return {"image": self.image, "index": self.index, "name": self.name,
                "architecture": self.native,
                "packages": [p.to_json(self.native) for p in self.packages]}


def list_packages(image_path: str, index_spec: str) -> PackageList:
    """The packages dpkg-query would list on a mount of the index (every one not in state
    not-installed: a purged package's stanza is not listed), sorted as dpkg-query sorts
    them: by name, then architecture."""
    with Image.open(image_path) as img:
        view = img.view(index_spec)
        status = _read(view, f"{ADMINDIR}/status", missing_ok=False)
        journal = [(f"{ADMINDIR}/updates/{n}", _read(view, f"{ADMINDIR}/updates/{n}"))
                   for n in _journal(view)]
    table: dict[tuple[str, str], Package] = {}
    for path, text in ((f"{ADMINDIR}/status", status), *journal):
        try:
            packages = parse_status(text or b"")
        except (ValueError, KeyError, IndexError) as e:
            raise CorruptImage(view.image.path, f"index {view.number}: {path} is not a "
                                                f"dpkg database ({e})") from None
        for pkg in packages:
            table[(pkg.name, pkg.architecture)] = pkg
    shown = [p for p in table.values() if p.state != "not-installed"]
    shown.sort(key=lambda p: (p.name, p.architecture))
    native = next((p.architecture for p in shown if p.name == "dpkg"), "")
    return PackageList(view.image.path, view.number, view.entry.name, native, shown)


def parse_status(text: bytes) -> list[Package]:
    """The stanzas of a dpkg status file (or journal entry) as Packages.  Bytes that are not
    UTF-8 are shown replaced (names and versions are ASCII in any real database)."""
    out = []
    lines = io.StringIO(text.decode("utf-8", "replace"))
    for para in Deb822.iter_paragraphs(lines, use_apt_pkg=False):
        name = para.get("Package", "").strip()
        if not name:
            continue
        words = para.get("Status", "").split()
        want, state = (words[0], words[2]) if len(words) == 3 else ("unknown", "not-installed")
        out.append(Package(name, para.get("Version", "").strip(),
                           para.get("Architecture", "").strip(),
                           para.get("Multi-Arch", "").strip(), want,
                           state if state in STATES else "not-installed"))
    return out


def _journal(view: IndexView) -> list[str]:
    """The names of dpkg's journal entries (updates/NNNN), in the order dpkg applies them."""
    try:
        updates = view.lookup(f"{ADMINDIR}/updates")
    except (NoSuchPath, NotADirectory):
        return []
    if updates.kind != F.DIR:
        return []
    names = [n.decode("ascii", "replace") for n, _kind, _ref in updates.entries]
    return sorted((n for n in names if n.isdigit()), key=int)


def _read(view: IndexView, path: str, missing_ok: bool = True) -> bytes | None:
    try:
        ino = view.lookup(path)
    except NoSuchPath:
        if missing_ok:
            return None
        raise UsageError(f"index {view.number} ({view.entry.name}) has no dpkg database "
                         f"({path}): not a Debian root filesystem") from None
    if ino.kind != F.REG:
        raise CorruptImage(view.image.path, f"index {view.number}: {path} is not a file")
    if ino.size > MAX_DATABASE:
        raise CorruptImage(view.image.path, f"index {view.number}: {path} is "
                                            f"{ino.size} bytes, more than a dpkg database")
    out = bytearray()
    while len(out) < ino.size:
        data = view.read(ino, len(out), ino.size - len(out))
        if not data:
            break
        out += data
    return bytes(out)
