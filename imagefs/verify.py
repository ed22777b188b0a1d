"""Verify: read and check every byte of an image file, and say what damage touches.

Every byte from 0 to the committed end belongs to something with a checksum: the header
(xxh3-64), the two root slots (xxh3-64, or all zero), and the frames, back to back, each
with a header checksum and a payload checksum.  On top of that every chunk is checked
against its xxh3-128 and SHA-256, every record is parsed with its bounds checked, and each
index's Merkle digest is recomputed from the records and chunk digests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from imagefs.format import layout as F
from imagefs.format.commit_record import Commit, IndexEntry
from imagefs.format.container import ImageFile
from imagefs.format.digest import node_digest
from imagefs.format.packs import ChunkLoc, ChunkTable, fast_hash
from imagefs.format.records import Inode, MetaReader
from imagefs.format.view import IndexView

from .errors import Error
from .image import select_index

MAX_PATHS = 20


@dataclass
class Problem:
    what: str
    indices: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    # Findings that are not damage by themselves (e.g. a commit left unpublished by a
    # writer that died before its slot write); shown, but verify still passes.
    notes: list[str] = field(default_factory=list)
    frames: int = 0
    chunks: int = 0
    records: int = 0
    indices: int = 0
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "frames": self.frames, "chunks": self.chunks,
                "records": self.records, "indices": self.indices,
                "checked_bytes": self.checked_bytes, "notes": self.notes,
                "problems": [{"what": p.what, "indices": p.indices, "paths": p.paths}
                             for p in self.problems]}


def verify(path: str, progress: Callable[[int], None] | None = None) -> Report:
    report = Report()
    with ImageFile.open(path) as image:
        _check_header(image, report)
        commit = image.read_commit()
        _check_slots(image, commit, report)
        _look_past_the_end(image, commit, report)
        table = _load_table(image, commit, report)
        bad_chunks = _check_frames(image, commit, table, report, progress)
        chunks = {(loc.pack_id(), loc.offset): loc for loc in table.all()}
        meta = MetaReader(image)
        checked: dict[int, _Checked] = {}  # root ref -> what its tree held
        for number, entry in enumerate(commit.indices, 1):
            report.indices += 1
            seen = checked.get(entry.root)
            if seen is None:
                view = IndexView(image, number, entry, meta=meta)
                seen = checked[entry.root] = _check_index(view, chunks, bad_chunks, report,
                                                          progress)
            else:
                # Indices that share a root (a commit that changed nothing, as a new index)
                # share a tree: it is walked once, and its problems affect each of them.
                for p in seen.problems:
                    if number not in p.indices:
                        p.indices.append(number)
            _check_totals(number, entry, seen, report)
        return report


@dataclass
class IndexReport(Report):
    """verify_index's report: which index, the root and digest it was checked at, and
    every path of the index whose content uses a damaged chunk (path -> why)."""

    number: int = 0
    name: str = ""
    root: int = 0
    digest: str = ""
    damaged: dict[str, str] = field(default_factory=dict)


def verify_index(path: str, index_spec: str | int,
                 progress: Callable[[int], None] | None = None) -> IndexReport:
    """verify() limited to one index: every chunk its files use (in the packs that hold
    them) and every record of its tree, its link counts, digests and totals.  The header,
    the slots and the chunks of other indices are not read (`imagefs verify` does)."""
    with ImageFile.open(path) as image:
        commit = image.read_commit()
        number, entry = select_index(commit, index_spec, path)
        report = IndexReport(number=number, name=entry.name, root=entry.root,
                             digest=entry.digest, indices=1)
        table = _load_table(image, commit, report)
        chunks = {(loc.pack_id(), loc.offset): loc for loc in table.all()}
        view = IndexView(image, number, entry, meta=MetaReader(image))
        used = _chunks_used(view)
        bad = _check_used_chunks(image, chunks, used, report, progress)
        seen = _check_index(view, chunks, bad, report, progress)
        _check_totals(number, entry, seen, report)
        for key, why in bad.items():
            for shown in used.get(key, []):
                report.damaged.setdefault(shown, why)
        return report


def _chunks_used(view: IndexView) -> dict[tuple[int, int], list[str]]:
    """(pack, offset) of every chunk the index's files use -> the paths using it.  A walk
    that breaks stops here; _check_index reports why."""
    used: dict[tuple[int, int], list[str]] = {}
    try:
        for path, ino in view.walk():
            if ino.kind == F.REG:
                shown = path.decode("utf-8", "backslashreplace")
                for ext in ino.extents:
                    users = used.setdefault((ext[1], ext[2]), [])
                    if not users or users[-1] != shown:
                        users.append(shown)
    except Error:
        pass
    return used


def _check_used_chunks(image: ImageFile, chunks: dict[tuple[int, int], ChunkLoc],
                       used: dict[tuple[int, int], list[str]], report: Report,
                       progress: Callable[[int], None] | None) -> dict[tuple[int, int], str]:
    """Read each pack holding a chunk in used once, check the frame and those chunks;
    the bad ones, (pack, offset) -> why.  Chunks the table lacks are _walk_index's."""
    by_pack: dict[int, list[ChunkLoc]] = {}
    for key in used:
        loc = chunks.get(key)
        if loc is not None:
            by_pack.setdefault(key[0], []).append(loc)
    bad: dict[tuple[int, int], str] = {}
    for pack in sorted(by_pack):
        try:
            info = image.frame_info(pack, F.KIND_PACK)
            payload = _pread(image, info.offset + F.FRAME_HEADER, info.stored)
            report.frames += 1
            report.checked_bytes += F.FRAME_HEADER + info.stored
            if progress:
                progress(F.FRAME_HEADER + info.stored)
            raw = image.decode_payload(info, payload)
        except Error as e:
            report.problems.append(Problem(str(e)))
            bad.update({(pack, loc.offset): "pack damaged" for loc in by_pack[pack]})
            continue
        for loc in by_pack[pack]:
            report.chunks += 1
            data = raw[loc.offset:loc.offset + loc.length]
            if len(data) != loc.length or fast_hash(data) != loc.xxh or \
                    hashlib.sha256(data).digest() != loc.sha:
                bad[(pack, loc.offset)] = "chunk checksum mismatch"
    mismatched = sum(1 for why in bad.values() if why == "chunk checksum mismatch")
    if mismatched:
        report.problems.append(Problem(f"{mismatched} chunk(s) fail their checksums"))
    return bad


def _load_table(image: ImageFile, commit: Commit, report: Report) -> ChunkTable:
    try:
        table = ChunkTable.load(image, commit)
    except Error as e:
        report.problems.append(Problem(f"chunk table: {e}"))
        return ChunkTable()
    if table.count != commit.chunks:
        report.problems.append(Problem(
            f"chunk table: the commit record says {commit.chunks} chunks; its "
            f"segments hold {table.count}"))
    return table


def _check_frames(image: ImageFile, commit: Commit, table: ChunkTable, report: Report,
                  progress: Callable[[int], None] | None) -> dict[tuple[int, int], str]:
    """Read every frame up to the committed end, checking each frame's checksums and every
    chunk of every pack; returns the chunks that are bad, (pack, offset) -> why."""
    by_pack: dict[int, list[ChunkLoc]] = {}
    for loc in table.all():
        by_pack.setdefault(loc.pack_id(), []).append(loc)
    bad_chunks: dict[tuple[int, int], str] = {}
    packs_seen: set[int] = set()
    try:
        for info in image.iter_frames(commit.data_end):
            report.frames += 1
            payload = _pread(image, info.offset + F.FRAME_HEADER, info.stored)
            report.checked_bytes += F.FRAME_HEADER + info.stored
            if progress:
                progress(F.FRAME_HEADER + info.stored)
            try:
                raw = image.decode_payload(info, payload)
            except Error as e:
                report.problems.append(Problem(str(e)))
                for loc in by_pack.get(info.offset, []):
                    bad_chunks[(info.offset, loc.offset)] = "pack damaged"
                packs_seen.add(info.offset)
                continue
            if info.kind == F.KIND_PACK:
                packs_seen.add(info.offset)
                for loc in by_pack.get(info.offset, []):
                    report.chunks += 1
                    data = raw[loc.offset:loc.offset + loc.length]
                    if len(data) != loc.length or fast_hash(data) != loc.xxh or \
                            hashlib.sha256(data).digest() != loc.sha:
                        bad_chunks[(info.offset, loc.offset)] = "chunk checksum mismatch"
    except Error as e:
        report.problems.append(Problem(f"frame chain broken: {e}"))
    for pack, locs in by_pack.items():
        if pack not in packs_seen:
            for loc in locs:
                bad_chunks[(pack, loc.offset)] = "pack missing"
    if bad_chunks and not any("pack" in p.what or "chunk" in p.what for p in report.problems):
        report.problems.append(Problem(f"{len(bad_chunks)} chunk(s) fail their checksums"))
    return bad_chunks


@dataclass
class _Checked:
    """What one walk of a tree found: its figures, its digest, the problems it raised
    (complete: the walk reached its end, so the figures and digest are the tree's)."""

    complete: bool = False
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    digest: str = ""
    problems: list[Problem] = field(default_factory=list)


def _check_totals(number: int, entry: IndexEntry, seen: _Checked, report: Report) -> None:
    """The commit record's figures and digest of an index against its tree's."""
    if not seen.complete:
        return  # the walk's own problem says why
    if seen.digest != entry.digest:
        report.problems.append(Problem(f"index {number}: index digest does not match",
                                       [number]))
    if (seen.files, seen.dirs, seen.bytes) != (entry.files, entry.dirs, entry.bytes):
        report.problems.append(Problem(
            f"index {number}: the commit record says {entry.files} files, {entry.dirs} "
            f"directories, {entry.bytes} bytes; the tree holds {seen.files}, {seen.dirs}, "
            f"{seen.bytes}", [number]))


def _check_slots(image: ImageFile, commit: Commit, report: Report) -> None:
    """Both root slots, not only the one in use: the standby slot must hold the previous
    generation, in its place, pointing at a valid commit of that generation.  A current
    slot rewritten to an older generation (a rollback) fails here, because the commit it
    points at says another generation."""
    slots = image.read_slots()
    current = commit.generation
    for i, slot in enumerate(slots):
        name = "AB"[i]
        if slot is None:
            if current >= 2:
                report.problems.append(Problem(
                    f"root slot {name} is empty, though the file is at generation {current} "
                    "(both slots are written from generation 2 on)"))
            continue
        if isinstance(slot, str):
            continue  # reported by _check_header
        gen, coff, clen, csum = slot
        if gen % 2 != i:
            report.problems.append(Problem(
                f"root slot {name} holds generation {gen}, which belongs in the other slot"))
        if gen == current:
            continue
        if gen != current - 1:
            report.problems.append(Problem(
                f"root slot {name} holds generation {gen}; the standby slot of generation "
                f"{current} should hold {current - 1}"))
        try:
            image.load_commit(gen, coff, clen, csum)
        except Error as e:
            report.problems.append(Problem(
                f"root slot {name} (generation {gen}, standby): {e.detail()}"))


def _look_past_the_end(image: ImageFile, commit: Commit, report: Report) -> None:
    """A valid commit after the committed end that is newer than the current one: a writer
    that died between its commit frame and its slot write leaves one (harmless: the next
    writer cuts it), and so does a rollback of the slots (see _check_slots).  Only frame
    headers are read, and the payload of commit frames."""
    pos, size = commit.data_end, image.size()
    while pos < size:
        try:
            info = image.frame_info(pos)
            if info.kind == F.KIND_COMMIT:
                found = Commit.decode(image.read_frame(pos, F.KIND_COMMIT), image.path, size)
                if found.generation > commit.generation:
                    report.notes.append(
                        f"a valid commit of generation {found.generation} at offset {pos} "
                        f"is newer than the one the root slots select ({commit.generation}):"
                        " a writer died before publishing it, or the slots were rolled back")
        except Error:
            return  # torn leftovers of a writer: nothing after them can be published
        pos = info.end


def _pread(image: ImageFile, off: int, n: int) -> bytes:
    return os.pread(image.fd, n, off)


def _check_header(image: ImageFile, report: Report) -> None:
    raw = os.pread(image.fd, F.HEADER_SIZE, 0)
    for i, slot in enumerate(image.read_slots()):
        if isinstance(slot, str):
            report.problems.append(Problem(f"root slot {'AB'[i]} is damaged ({slot})"))
    used = [(0, F.HEADER_USED)] + [(o, o + F.SLOT_SIZE) for o in F.SLOT_OFFSETS]
    pos = 0
    for a, b in sorted(used):
        if any(raw[pos:a]):
            report.problems.append(Problem(f"header bytes {pos}..{a} should be zero"))
        pos = b
    if any(raw[pos:]):
        report.problems.append(Problem(f"header bytes {pos}..{F.HEADER_SIZE} should be zero"))


def _check_index(view: IndexView, chunks: dict[tuple[int, int], ChunkLoc],
                 bad_chunks: dict[tuple[int, int], str], report: Report,
                 progress: Callable[[int], None] | None = None) -> _Checked:
    """Parse every record, check every extent against the chunk table, recompute digests."""
    found = _Checked()
    before = len(report.problems)
    try:
        _walk_index(view, chunks, bad_chunks, report, found, progress)
    finally:
        found.problems = report.problems[before:]
    return found


def _walk_index(view: IndexView, chunks: dict[tuple[int, int], ChunkLoc],
                bad_chunks: dict[tuple[int, int], str], report: Report, found: _Checked,
                progress: Callable[[int], None] | None) -> None:
    number = view.number
    damaged_paths: list[str] = []
    digests: dict[int, bytes] = {}
    order: list[tuple[str, Inode]] = []
    names: dict[int, int] = {}  # non-directory ref -> names of it in the index
    files = dirs = nbytes = 0
    try:
        for path, ino in view.walk():
            report.records += 1
            if progress and not report.records % 4096:
                progress(0)  # a chance to cancel, between records
            shown = path.decode("utf-8", "backslashreplace")
            if ino.kind == F.DIR:
                dirs += 1
            else:
                files += 1
                names[ino.ref] = names.get(ino.ref, 0) + 1
            if ino.ref in digests:
                continue
            if ino.kind == F.REG:
                nbytes += ino.size
            digests[ino.ref] = b""
            order.append((shown, ino))
            if ino.kind != F.REG:
                continue
            for ext in ino.extents:
                key = (ext[1], ext[2])
                loc = chunks.get(key)
                if loc is None or loc.length != ext[3] or loc.xxh != ext[4]:
                    report.problems.append(Problem(
                        f"index {number}: {shown} refers to a chunk the file does not hold",
                        [number], [shown]))
                    break
                if key in bad_chunks:
                    damaged_paths.append(shown)
                    break
    except Error as e:
        report.problems.append(Problem(f"index {number}: {e}", [number]))
        return
    if damaged_paths:
        report.problems.append(Problem(
            f"index {number}: {len(damaged_paths)} file(s) use damaged chunks",
            [number], damaged_paths[:MAX_PATHS]))
    found.files, found.dirs, found.bytes = files, dirs, nbytes
    _check_links(number, order, names, report)
    _check_digests(number, order, chunks, digests, report)
    found.digest = digests.get(view.entry.root, b"").hex()
    found.complete = True


def _check_links(number: int, order: list[tuple[str, Inode]], names: dict[int, int],
                 report: Report) -> None:
    """Each inode's link count is its names in the index (a directory's: 2 + subdirs)."""
    wrong_links = [shown for shown, ino in order
                   if (ino.kind == F.DIR and ino.nlink != 2 + sum(
                       1 for _n, k, _r in ino.entries if k == F.DIR))
                   or (ino.kind != F.DIR and ino.nlink != names.get(ino.ref, 0))]
    if wrong_links:
        report.problems.append(Problem(
            f"index {number}: {len(wrong_links)} inode(s) with a link count other than "
            "their names in the index", [number], wrong_links[:MAX_PATHS]))


def _check_digests(number: int, order: list[tuple[str, Inode]],
                   chunks: dict[tuple[int, int], ChunkLoc], digests: dict[int, bytes],
                   report: Report) -> None:
    """Digests bottom-up: non-directories first (a hardlink's first name may be walked
    before a later directory holding it), then directories, children before parents."""
    for shown, ino in sorted(reversed(order), key=lambda o: o[1].kind == F.DIR):
        if ino.kind == F.REG:
            shas = [chunks[(e[1], e[2])].sha if (e[1], e[2]) in chunks else bytes(32)
                    for e in ino.extents]
            d = node_digest(ino, shas, ())
        elif ino.kind == F.DIR:
            d = node_digest(ino, (), [digests.get(r, b"") for _n, _k, r in ino.entries])
        else:
            d = node_digest(ino, (), ())
        digests[ino.ref] = d
        if d != ino.digest:
            report.problems.append(Problem(
                f"index {number}: {shown}: stored digest does not match its content",
                [number], [shown]))
