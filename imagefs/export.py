"""Export: chosen indices into another image file, holding only what they reference.

Chunks are read back, checked, and re-packed and recompressed at the level asked; indices
keep their names, descriptions, creation times, history and digests (an export whose
digest differs from its source is refused).  A new DEST appears whole or not at all: it is
written as an unnamed file (O_TMPFILE) and linked into place at the end.  An existing DEST
gets the indices appended, in one commit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from imagefs.format import layout as F
from imagefs.format.container import ImageFile
from imagefs.format.files import pwrite_all
from imagefs.format.packs import PackWriter
from imagefs.format.view import IndexView
from imagefs.format.writer import PendingInode, Transaction, add_index, history_entry

from .errors import CorruptImage, DestinationError, UsageError
from .image import Image, check_level, check_new_name, is_image_file


def copy_tree(view: IndexView, packs: PackWriter,
              progress: Callable[[int], None] | None = None) -> PendingInode:
    """The index as a PendingInode tree whose content is (re)stored through packs."""
    root = PendingInode(view.root())
    nodes = {root.ino.ref: root}
    stack = [root]
    while stack:
        node = stack.pop()
        kids = []
        for name, _kind, ref in node.ino.entries:
            child = nodes.get(ref)
            if child is None:
                child = nodes[ref] = PendingInode(view.get(ref))
                if child.ino.kind == F.DIR:
                    stack.append(child)
                elif child.ino.kind == F.REG:
                    for foff, data in view.iter_data(child.ino):
                        child.locs.append((foff, packs.add_chunk(data)))
                        if progress:
                            progress(len(data))
            elif child.ino.kind == F.DIR:
                raise CorruptImage(view.image.path, "a directory appears twice in the tree")
            kids.append((name, child))
        node.children = kids
    return root


def parse_selection(image: Image, selection: str) -> list[int]:
    return [number for number, _entry in image.select_many(selection)]


def export(src: str, selection: str, dest: str, level: int = 9,
           progress: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None,
           who: dict[str, Any] | None = None, wait: float | None = None) -> list[int]:
    """Export the selected indices of src into dest; the new index numbers in dest.
    `wait`: how long to wait for another writer of an existing dest (None: as long as it
    takes; 0: Busy at once, for a caller that retries cancellably)."""
    check_level(level)
    with Image.open(src) as image:
        numbers = parse_selection(image, selection)
        if not numbers:
            raise UsageError(f"{src}: no indices to export")
        if on_total:
            on_total(sum(image.indices[n - 1].bytes for n in numbers))
        if os.path.exists(dest):
            if os.path.samefile(src, dest):
                raise UsageError("export into the same file: DEST must be another file")
            if not is_image_file(dest):
                raise DestinationError(dest, "exists and is not an imagefs image")
            with ImageFile.open(dest, writable=True) as out:
                return _export_into(image, numbers, out, level, progress, who, wait)
        out = _new_unnamed(dest)
        try:
            result = _export_into(image, numbers, out, level, progress, who)
            try:
                _link_unnamed(out.fd, dest)
            except FileExistsError:
                raise DestinationError(dest, "appeared while exporting; nothing was "
                                             "written") from None
            return result
        finally:
            out.close()


def _export_into(image: Image, numbers: list[int], out: ImageFile, level: int,
                 progress: Callable[[int], None] | None,
                 who: dict[str, Any] | None = None, wait: float | None = None) -> list[int]:
    new = []
    with Transaction(out, level, wait=wait) as tx:
        for n in numbers:
            packs = tx.pack_writer()
            entry = image.indices[n - 1]
            check_new_name(tx.commit, entry.name)
            root = copy_tree(IndexView(image.file, n, entry), packs, progress)
            stats = tx.write_tree(root)
            if stats.digest.hex() != entry.digest:
                raise CorruptImage(image.path, f"index {n} does not match its digest; "
                                               "run `imagefs verify`")
            new.append(add_index(tx.commit, entry.name, entry.description, stats,
                                 history_entry("export", who, source=os.path.abspath(image.path),
                                               source_index=n, level=level,
                                               result={"index": len(tx.commit.indices) + 1,
                                                       "files": stats.files,
                                                       "bytes": stats.bytes}),
                                 created=entry.created, old_history=entry.history))
        tx.publish()
    return new


def _link_unnamed(fd: int, dest: str) -> None:
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


def _new_unnamed(dest: str) -> ImageFile:
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        raise DestinationError(dest, "its directory does not exist") from None
    except OSError as e:
        raise DestinationError(dest, e.strerror) from None
    try:
        header = ImageFile.new_header()
        pwrite_all(fd, header, 0)
        return ImageFile(dest, fd, ImageFile.parse_header(dest, fd), writable=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
