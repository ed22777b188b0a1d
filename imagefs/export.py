"""Export: chosen indices into another image file, holding only what they reference.

Packs move as they are stored whenever they can: a pack every chunk of which the exported
indices use is copied as its bytes (its frame checksum checked as it is read, so a damaged
pack is reported, never copied), with the chunks' checksums and offsets as they were.  Only
the chunks of partly used packs are read back, checked and repacked (at DEFAULT_LEVEL), and
so is every chunk when a level is asked (`--level`: recompress everything at it).  Memory
holds the tree of records and the chunk tables, never the content.

Indices keep their names, descriptions, creation times, history and digests (an export
whose digest differs from its source is refused).  A new DEST appears whole or not at all:
it is written as an unnamed file (O_TMPFILE) and linked into place at the end.  An existing
DEST gets the indices appended, in one commit; there a pack is copied only when none of its
chunks is already stored, so nothing is stored twice.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from typing import Any

from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.files import give_back_free_memory, pwrite_all
from imagefs.format.pack_copy import PackCopier
from imagefs.format.packs import ChunkLoc, ChunkTable, PackReader, PackWriter
from imagefs.format.records import Inode, MetaReader
from imagefs.format.relocate import ChunkKey, ChunkUse, RecordMover, named_files, used_chunks
from imagefs.format.view import IndexView
from imagefs.format.writer import Transaction, TreeStats, add_index, history_entry

from .content_class import HEAD, order_key
from .errors import CorruptImage, DestinationError, UsageError
from .image import (
    Image,
    check_level,
    check_new_name,
    is_image_file,
    profile_level,
    profile_pack_target,
)

REPACK_CACHE = 4 << 20  # decompressed packs kept while partly used ones are repacked
GROUPED_CACHE = 64 << 20  # the compact profile reads the source's packs out of order
META_CACHE = 4 << 20  # decompressed metadata blocks kept while the trees are read


def place_packs(image: Image, used: dict[int, set[ChunkUse]], copier: PackCopier,
                writer: PackWriter, reader: PackReader, recompress: bool,
                progress: Callable[[int], None] | None = None) -> dict[ChunkKey, ChunkLoc]:
    """Where every used chunk goes (relocate.used_chunks: pack -> chunks), by (source
    pack, offset, length, xxh3-128): a pack all of whose chunks are used, and none of which
    the destination holds already, is copied as stored (unless recompress); the used chunks
    of every other pack (also one a crafted extent names and no table lists) are read,
    checked and stored through writer, in the source's order.  Done before any record is
    written, so that every record is written once, with its chunks' final places.
    progress(0) after each pack: a chance to cancel."""
    chunks: dict[int, list[ChunkLoc]] = {}
    for loc in ChunkTable.load(image.file, image.commit).all():
        chunks.setdefault(loc.pack_id(), []).append(loc)
    moved: dict[ChunkKey, ChunkLoc] = {}
    for pack in sorted(used):  # file order: the source is read front to back
        have = chunks.get(pack, [])
        whole = not recompress and len(have) == len(used[pack]) \
            and used[pack] == {(c.offset, c.length, c.xxh) for c in have} \
            and _apart(have) \
            and not any(copier.table.find(c.xxh, c.sha) is not None for c in have)
        if whole:
            for c, loc in zip(have, copier.copy(pack, have), strict=True):
                moved[(pack, c.offset, c.length, c.xxh)] = loc
        else:
            # A chunk the destination holds (its table says so, by the SHA-256 the source's
            # table gives) is not read: a pull then fetches no pack it does not need.
            shas = {(c.offset, c.length, c.xxh): c.sha for c in have}
            for poff, length, xxh in sorted(used[pack]):
                sha = shas.get((poff, length, xxh))
                held = writer.table.find(xxh, sha) if sha is not None else None
                if held is None or held.length != length:  # a crafted table may lie
                    held = writer.add_chunk(reader.read_chunk(pack, poff, length, xxh))
                moved[(pack, poff, length, xxh)] = held
        if progress:
            progress(0)
    return moved


def place_grouped(views: list[IndexView], writer: PackWriter, reader: PackReader,
                  progress: Callable[[int], None] | None = None,
                  directories: dict[int, Inode] | None = None) -> dict[ChunkKey, ChunkLoc]:
    """Every chunk the views' files use, read, checked and stored through writer with the
    files ordered by kind, extension and name (content_class: the compact profile).  The
    files' heads are read in the source's order; their content then in the new order,
    which a source written in this profile already has.  The directories read are kept in
    `directories` (relocate.named_files)."""
    files = named_files(views, directories)
    files.sort(key=lambda f: f[1][0][:2] if f[1] else (0, 0))  # heads in pack order
    keyed = [(order_key(name, reader.read_chunk(*keys[0])[:HEAD] if keys and starts
                        else b""), keys) for name, keys, starts in files]
    del files
    keyed.sort(key=lambda k: k[0])
    moved: dict[ChunkKey, ChunkLoc] = {}
    for _key, keys in keyed:
        for chunk in keys:
            if chunk not in moved:
                moved[chunk] = writer.add_chunk(reader.read_chunk(*chunk))
        if progress:
            progress(0)
    return moved


def _apart(chunks: list[ChunkLoc]) -> bool:
    """The table lists these chunks of one pack without overlaps, as a writer lists them
    (a crafted table may not): only then are they copied as listed."""
    ordered = sorted(chunks, key=lambda c: c.offset)
    return all(a.offset + a.length <= b.offset for a, b in itertools.pairwise(ordered))


def parse_selection(image: Image, selection: str) -> list[int]:
    return [number for number, _entry in image.select_many(selection)]


def export(src: str, selection: str, dest: str, level: int | None = None,
           progress: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None,
           who: dict[str, Any] | None = None, wait: float | None = None,
           compact: bool = False, check: bool = False) -> list[int]:
    """Export the selected indices of src into dest; the new index numbers in dest.
    `wait`: how long to wait for another writer of an existing dest (None: as long as it
    takes; 0: Busy at once, for a caller that retries cancellably).  level: recompress
    every chunk at it; None: move whole packs as they are, repack the rest at
    DEFAULT_LEVEL.  check: also decompress every copied pack and check its chunks."""
    if level is not None:
        check_level(level)
    with Image.open(src) as image:
        numbers = parse_selection(image, selection)
        if not numbers:
            raise UsageError(f"{src}: no indices to export")
        if on_total:
            on_total(sum(image.indices[n - 1].bytes for n in numbers))
        if os.path.exists(dest) and os.path.samefile(src, dest):
            raise UsageError("export into the same file: DEST must be another file")
        return write_into(dest, lambda out, wait: export_all_into(
            image, numbers, out, level, progress, who, wait, compact=compact, check=check),
            wait, profile_pack_target(compact))


def write_into(dest: str, write: Callable[[ImageFile, float | None], list[int]],
               wait: float | None, pack_target: int = F.PACK_TARGET,
               doing: str = "exporting") -> list[int]:
    """write(out, wait) into dest: an existing image (its own transaction appends), or a
    new file that appears whole or not at all (written unnamed, linked at the end)."""
    if os.path.exists(dest):
        if not is_image_file(dest):
            raise DestinationError(dest, "exists and is not an imagefs image")
        with ImageFile.open(dest, writable=True) as out:
            return write(out, wait)
    out = new_unnamed(dest, pack_target)
    try:
        result = write(out, None)
        try:
            link_unnamed(out.fd, dest)
        except FileExistsError:
            raise DestinationError(dest, f"appeared while {doing}; nothing was "
                                         "written") from None
        return result
    finally:
        out.close()


def export_all_into(image: Image, numbers: list[int], out: ImageFile, level: int | None,
                    progress: Callable[[int], None] | None,
                    who: dict[str, Any] | None = None, wait: float | None = None,
                    action: str = "export", compact: bool = False,
                    check: bool = False) -> list[int]:
    """The indices numbers of image written into out in one transaction; their numbers
    there.  action names the history entry each gets (export, optimize).  Indices with the
    same root share its records.  compact: every chunk recompressed (at COMPACT_LEVEL
    unless level says) into out's packs.  check: every copied pack is also decompressed
    and each of its chunks checked (PackCopier)."""
    return export_sources_into([(image, numbers, os.path.abspath(image.path))], out, level,
                               progress, who, wait, action, compact, check)


def export_sources_into(sources: list[tuple[Image, list[int], str]], out: ImageFile,
                        level: int | None, progress: Callable[[int], None] | None,
                        who: dict[str, Any] | None = None, wait: float | None = None,
                        action: str = "export", compact: bool = False,
                        check: bool = False) -> list[int]:
    """export_all_into for indices of several images (image, numbers, what the history
    names as their source) in one transaction: a pull of several indices from a store."""
    recompress = level is not None or compact
    level = profile_level(level, compact)
    # Moving packs, one compressing thread repacks the few partly used ones while the main
    # one reads and checks, and memory stays low (a compressor context is ~11 MB at level
    # 9); recompressing everything takes one per CPU.
    with Transaction(out, level, wait=wait, pack_threads=None if recompress else 1) as tx:
        names = {e.name for e in tx.commit.indices}
        new = []
        for image, numbers, source in sources:
            new += _move_indices(tx, image, numbers, source, names, level, recompress,
                                 progress, who, action, compact, check)
        tx.publish()
    return new


def _move_indices(tx: Transaction, image: Image, numbers: list[int], source: str,
                  names: set[str], level: int, recompress: bool,
                  progress: Callable[[int], None] | None, who: dict[str, Any] | None,
                  action: str, compact: bool, check: bool) -> list[int]:
    meta = MetaReader(image.file, META_CACHE)
    packs = PackReader(image.file, GROUPED_CACHE if compact else REPACK_CACHE)
    views = [IndexView(image.file, n, image.indices[n - 1], meta, packs) for n in numbers]
    for view in views:
        check_new_name(tx.commit, view.entry.name, taken=names)
        names.add(view.entry.name)
    copier = PackCopier(image.file, tx.image, tx.pack_writer().table, check_chunks=check)
    try:
        directories: dict[int, Inode] = {}  # as the walk for the chunks read them
        if compact:
            moved = place_grouped(views, tx.pack_writer(), packs, progress, directories)
        else:
            moved = place_packs(image, used_chunks(views, directories), copier,
                                tx.pack_writer(), packs, recompress, progress)
        tx.finish_packs()  # its compressors end with its threads, before records move
        give_back_free_memory()
        new = []
        with tx.metadata() as out_meta:
            mover = RecordMover(out_meta, moved, progress, directories)
            written: dict[int, TreeStats] = {}  # source root -> the tree as written
            for view in views:
                stats = written.get(view.entry.root)
                if stats is None:
                    stats = written[view.entry.root] = mover.move(view)
                elif progress:
                    progress(view.entry.bytes)
                if stats.digest.hex() != view.entry.digest:
                    raise CorruptImage(image.path, f"index {view.number} does not match "
                                                   "its digest; run `imagefs verify`")
                history = history_entry(action, who, source=source,
                                        source_index=view.number,
                                        **({"level": level} if recompress else {}),
                                        **({"profile": "compact"} if compact else {}))
                history["result"] = {"index": len(tx.commit.indices) + 1,
                                     "files": stats.files, "bytes": stats.bytes}
                new.append(add_index(tx.commit, view.entry.name, view.entry.description,
                                     stats, history, created=view.entry.created,
                                     old_history=view.entry.history))
        copier.finish()  # every copied pack's chunks checked before anything is published
    finally:
        copier.abort()
    tx.copied_packs(copier.stored_bytes)
    return new


def link_unnamed(fd: int, dest: str) -> None:
    """Give the O_TMPFILE file fd the name dest; FileExistsError if dest exists.  os.link
    with a dst_dir_fd calls linkat(2) with AT_SYMLINK_FOLLOW, which links the file that
    /proc/self/fd/FD names, not the magic link itself."""
    os.fsync(fd)
    dirfd = os.open(os.path.dirname(os.path.abspath(dest)),
                    os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", os.path.basename(dest), dst_dir_fd=dirfd)
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def new_unnamed(dest: str, pack_target: int = F.PACK_TARGET) -> ImageFile:
    """A new, empty image file without a name yet (O_TMPFILE in dest's directory)."""
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        raise DestinationError(dest, "its directory does not exist") from None
    except OSError as e:
        raise DestinationError(dest, e.strerror) from None
    try:
        header = ImageFile.new_header(pack_target)
        pwrite_all(fd, header, 0)
        out = ImageFile(dest, fd, ImageFile.parse_header(dest, fd), writable=True)
        out.unnamed = True
        return out
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
