"""imagefs apply IMAGE INDEX DEST: a whole index onto a folder."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imagefs.apply import Applier

from ._common import human, progress
from ._store import add_read_options, open_image


def register(sub: Any) -> None:
    p = sub.add_parser(
        "apply", help="write a whole index onto a folder, with all metadata",
        description="Write every file of an index into DEST (created if missing), with "
                    "owners, modes, times, xattrs, ACLs, capabilities, hardlinks, devices "
                    "and sparse holes. Entries already in DEST with the same names are "
                    "replaced; others are left alone. Run as root to restore owners and "
                    "devices.",
        epilog="example: imagefs apply golden.imagefs bookworm-web /mnt/target")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("dest", metavar="DEST")
    add_read_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with open_image(args) as img, progress("applying") as bar:
        view = img.view(args.index)
        bar.total(view.entry.bytes)
        Applier(view, progress=bar.advance).apply(args.dest)
        print(f"applied index {view.number} ({view.entry.name}): {view.entry.files} files, "
              f"{human(view.entry.bytes)} to {args.dest}", file=sys.stderr)
    return 0
