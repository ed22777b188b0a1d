"""imagefs cat IMAGE INDEX PATH: one file's bytes to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imagefs.errors import UsageError
from imagefs.format import layout as F

from ._store import add_read_options, open_image


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cat", help="write a file of an index to stdout",
        description="Write the content of PATH in an index to standard output. Symlinks are "
                    "followed inside the image. Only the chunks of that file are read.",
        epilog="example: imagefs cat golden.imagefs 1 /etc/os-release")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("path", metavar="PATH")
    add_read_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_image(args) as img:
        view = img.view(args.index)
        ino = view.lookup(args.path)
        if ino.kind != F.REG:
            raise UsageError(f"{args.path}: not a regular file "
                             f"(a {F.KIND_NAMES[ino.kind]})")
        out = sys.stdout.buffer
        pos = 0
        step = 4 << 20
        while pos < ino.size:
            data = view.read(ino, pos, step)
            out.write(data)
            pos += len(data)
        out.flush()
    return 0
