"""The public face of an image file: open it, name its indices, capture, delete.

    with Image.open("golden.imagefs") as img:
        view = img.view("bookworm-web")          # by name or number (from 1)
        data = view.read(view.lookup("/etc/hostname"), 0, 4096)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from imagefs.format import layout as F
from imagefs.format.commit_record import Commit, IndexEntry
from imagefs.format.container import ImageFile
from imagefs.format.files import open_regular
from imagefs.format.packs import PackReader
from imagefs.format.view import IndexView

from .errors import Error, NoSuchIndex, UsageError

DEFAULT_LEVEL = 9


@dataclass
class CaptureResult:
    index: int
    name: str
    files: int
    bytes: int
    new_bytes: int  # bytes of chunks this capture added (not already in the file)
    stored_bytes: int  # compressed bytes those took on disk


class Image:
    def __init__(self, file: ImageFile) -> None:
        self.file = file
        self.path = file.path
        self.commit = file.read_commit()

    @classmethod
    def open(cls, path: str, writable: bool = False) -> Image:
        f = ImageFile.open(path, writable)
        try:
            return cls(f)
        except BaseException:
            f.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def indices(self) -> list[IndexEntry]:
        return self.commit.indices

    def select(self, spec: str | int) -> tuple[int, IndexEntry]:
        """An index by number (from 1) or by name."""
        return select_index(self.commit, spec, self.path)

    def select_many(self, selection: str) -> list[tuple[int, IndexEntry]]:
        """The indices a selection names: "all", or numbers and names separated by commas
        ("1,web"), each once, in the order given."""
        if selection == "all":
            return list(enumerate(self.indices, 1))
        chosen: dict[int, IndexEntry] = {}
        for part in selection.split(","):
            number, entry = self.select(part.strip())
            chosen.setdefault(number, entry)
        return list(chosen.items())

    def describe(self, spec: str | int | None = None, history: bool = False
                 ) -> dict[str, Any]:
        """What `imagefs info --json` prints (and the daemon's images.info answers): the
        file's figures and its indices (or one), from the commit record alone."""
        c = self.commit
        chosen = [self.select(spec)] if spec is not None else list(enumerate(self.indices, 1))
        logical = sum(e.bytes for e in c.indices)
        return {
            "image": self.path,
            "format_version": self.file.header.version,
            "generation": c.generation,
            "size_on_disk": os.fstat(self.file.fd).st_size,
            "unique_bytes": c.unique_bytes,
            "stored_bytes": c.stored_bytes,
            "chunks": c.chunks,
            "logical_bytes": logical,
            "dedup_ratio": round(logical / c.unique_bytes, 3) if c.unique_bytes else None,
            "compression_ratio": (round(c.unique_bytes / c.stored_bytes, 3)
                                  if c.stored_bytes else None),
            "indices": [
                {"index": n, **{k: v for k, v in asdict(e).items()
                                if k != "history" or history}}
                for n, e in chosen
            ],
        }

    def view(self, spec: str | int, packs: PackReader | None = None) -> IndexView:
        number, entry = self.select(spec)
        return IndexView(self.file, number, entry, packs=packs)


def find_index(indices: list[IndexEntry], spec: str | int, by_number: bool = True
               ) -> tuple[int, IndexEntry] | None:
    """(number from 1, entry) of the index spec names: a number (unless by_number is
    False: a session remembers its index by name only), else a name; None if none."""
    s = str(spec)
    if by_number and s.isdigit():
        n = int(s)
        if 1 <= n <= len(indices):
            return n, indices[n - 1]
    for i, e in enumerate(indices, 1):
        if e.name == s:
            return i, e
    return None


def select_index(commit: Commit, spec: str | int, path: str) -> tuple[int, IndexEntry]:
    """find_index, or NoSuchIndex naming the image at path."""
    found = find_index(commit.indices, spec)
    if found is None:
        raise NoSuchIndex(path, str(spec), len(commit.indices))
    return found


def profile_level(level: int | None, compact: bool) -> int:
    """The zstd level a writer uses: the one asked (checked), else the profile's."""
    if level is not None:
        check_level(level)
        return level
    return F.COMPACT_LEVEL if compact else DEFAULT_LEVEL


def profile_pack_target(compact: bool) -> int:
    """The pack target a new file gets: the compact profile's, or the default."""
    return F.COMPACT_PACK_TARGET if compact else F.PACK_TARGET


def check_new_name(commit: Commit, name: str, taken: set[str] | None = None) -> None:
    """Refuse a name no index may have, or one the commit's indices (or taken, when the
    caller keeps them in a set) already use."""
    if not name or name.isdigit() or "\n" in name or len(name) > 255:
        raise UsageError(f"{name!r}: an index name must be 1-255 characters, not all digits "
                         "(numbers name indices by position), without newlines")
    if name in taken if taken is not None else any(e.name == name for e in commit.indices):
        raise UsageError(f"an index named {name!r} already exists; choose another name")


def open_for_writing(path: str, pack_target: int = F.PACK_TARGET) -> ImageFile:
    """Open path for appending, creating an empty image first if there is none (with
    pack_target in its header)."""
    if not os.path.exists(path):
        # Another writer may create it meanwhile: then append to theirs.
        with contextlib.suppress(FileExistsError):
            ImageFile.create(path, pack_target)
    return ImageFile.open(path, writable=True)


def capture(image_path: str, src: str, name: str, description: str = "",
            level: int | None = None, progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None,
            on_wait: Callable[[], None] | None = None,
            wait: float | None = None, who: dict[str, Any] | None = None,
            compact: bool = False) -> CaptureResult:
    """Capture the directory src as a new index of image_path (created if missing).
    level: DEFAULT_LEVEL, or with compact COMPACT_LEVEL; compact also gives a new file
    the compact profile's packs (an existing file keeps its own)."""
    from imagefs.format.writer import Transaction, add_index, history_entry

    from .capture import TreeCapture  # here: pyfastcdc and the walk cost a mount 18 ms

    level = profile_level(level, compact)
    if not os.path.isdir(src):
        raise UsageError(f"{src}: the source must be an existing directory")
    with open_for_writing(image_path, profile_pack_target(compact)) as f, \
            Transaction(f, level, wait=wait, on_wait=on_wait) as tx:
        check_new_name(tx.commit, name)
        st = os.fstat(f.fd)
        packs = tx.pack_writer()
        cap = TreeCapture(packs, f.header.chunk_min, f.header.chunk_avg, f.header.chunk_max,
                          progress=progress, skip=(st.st_dev, st.st_ino))
        root, total = cap.scan(src)
        if on_total:
            on_total(total)
        cap.read_contents(root, grouped=compact)
        stats = tx.write_tree(root)
        result = CaptureResult(len(tx.commit.indices) + 1, name, stats.files, stats.bytes,
                               packs.new_bytes, packs.stored_bytes)
        add_index(tx.commit, name, description, stats,
                  history_entry("capture", who, source=os.path.abspath(src), level=level,
                                result=asdict(result),
                                **({"profile": "compact"} if compact else {})))
        tx.publish()
        return result


def delete(image_path: str, spec: str, wait: float | None = None) -> tuple[int, IndexEntry]:
    """Remove one index; later indices move down by one (as in WIM files)."""
    from imagefs.format.writer import Transaction

    with ImageFile.open(image_path, writable=True) as f, Transaction(f, wait=wait) as tx:
        number, entry = select_index(tx.commit, spec, image_path)
        del tx.commit.indices[number - 1]
        tx.publish()
        return number, entry


def check_level(level: int) -> None:
    if not 1 <= level <= 22:
        raise UsageError(f"--level {level}: zstd levels run from 1 to 22")


def is_image_file(path: str) -> bool:
    """Whether path is a regular file that starts like an image (never blocks: a FIFO
    there is "not an image", not a wait)."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except Error:
        return False
    try:
        return os.pread(fd, len(F.MAGIC), 0) == F.MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)
