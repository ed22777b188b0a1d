"""imagefs ls IMAGE INDEX [PATH]: list a directory of an index without extracting."""

from __future__ import annotations

import argparse
import stat
import time
from typing import Any

from imagefs.format import layout as F
from imagefs.format.records import Inode
from imagefs.format.view import IndexView

from ._common import write_path
from ._store import add_read_options, open_image


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ls", help="list a directory of an index",
        description="List PATH (default /) of an index. Reads only the records of that "
                    "directory (and, with -R, below it). Names are printed as stored, "
                    "byte for byte.",
        epilog="example: imagefs ls golden.imagefs bookworm-web /etc -l")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long format: mode, links, owner, size, mtime")
    p.add_argument("-R", dest="recursive", action="store_true", help="list subdirectories")
    add_read_options(p)
    p.set_defaults(func=run)


def long_line(ino: Inode, name: bytes) -> bytes:
    mode = stat.filemode(ino.mode)
    size = ino.size if ino.kind != F.CHR and ino.kind != F.BLK else 0
    if ino.kind in (F.CHR, F.BLK):
        sizes = f"{ino.rdev >> 8 & 0xfff}, {ino.rdev & 0xff | (ino.rdev >> 12) & 0xfff00}"
    else:
        sizes = str(size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ino.mtime_ns // 1_000_000_000))
    head = f"{mode} {ino.nlink:>3} {ino.uid:>5} {ino.gid:>5} {sizes:>10} {when} ".encode()
    tail = b" -> " + ino.target if ino.kind == F.LNK else b""
    return head + name + tail


def run(args: argparse.Namespace) -> int:
    with open_image(args) as img:
        view = img.view(args.index)
        top = view.lookup(args.path, follow=not args.long)
        if top.kind != F.DIR:
            write_path(long_line(top, args.path.encode(errors="surrogateescape"))
                       if args.long else args.path.encode(errors="surrogateescape"))
            return 0
        if args.recursive:
            _list_recursive(view, top, args.path.rstrip("/").encode(errors="surrogateescape"),
                            args.long)
        else:
            _list(view, top, args.long)
    return 0


def _list(view: IndexView, d: Inode, long: bool) -> None:
    for name, _kind, ref in d.entries:
        write_path(long_line(view.get(ref), name) if long else name)


def _list_recursive(view: IndexView, top: Inode, prefix: bytes, long: bool) -> None:
    for path, ino in view.walk(top, prefix):
        write_path(long_line(ino, path) if long else path)
