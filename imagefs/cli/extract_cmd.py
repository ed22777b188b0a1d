"""imagefs extract IMAGE INDEX PATH... --dest DIR: chosen paths, with their metadata."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.apply import Applier
from imagefs.format.view import image_path_parts
from imagefs.image import Image


def register(sub: Any) -> None:
    p = sub.add_parser(
        "extract", help="extract files or directories of an index into a folder",
        description="Extract each PATH (file or directory, with everything under it) into "
                    "DIR, keeping its path from the image root (DIR/etc/hostname for "
                    "/etc/hostname) and all its metadata. Symlinks on the way to PATH are "
                    "followed inside the image; nothing is ever written outside DIR ('..' "
                    "in a PATH is refused).",
        epilog="example: imagefs extract golden.imagefs 2 /etc/nginx /etc/hostname --dest out")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--dest", required=True, metavar="DIR", help="folder to extract into")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The written path is built from the checked names alone ("/etc//./hostname" is
    # DEST/etc/hostname); a ".." is refused before anything is opened.
    paths = [b"/".join(image_path_parts(p)) for p in args.paths]
    with Image.open(args.image) as img:
        view = img.view(args.index)
        found = [(p, view.lookup(p, follow=False)) for p in paths]
        for path, ino in found:
            Applier(view).extract(args.dest, path, ino)
    return 0
