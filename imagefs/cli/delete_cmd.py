"""imagefs delete IMAGE INDEX: remove an index (atomically)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imagefs.image import delete

from ._common import add_wait
from ._daemon import absolute, add_daemon_options, call, daemon_client


def register(sub: Any) -> None:
    p = sub.add_parser(
        "delete", help="remove an index from an image file",
        description="Remove one index; the indices after it move down by one, as in WIM "
                    "files. The space is not reclaimed in place: `imagefs export IMAGE all "
                    "NEW` writes a compacted copy.",
        epilog="example: imagefs delete golden.imagefs old-build")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    add_wait(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with daemon_client(args) as c:
        if c is not None:
            r = call(c, "images.delete", image=absolute(args.image), index=args.index)
            number, name = r["index"], r["name"]
        else:
            number, entry = delete(args.image, args.index, wait=args.wait)
            name = entry.name
    print(f"deleted index {number} ({name})", file=sys.stderr)
    return 0
