"""imagefs delete IMAGE INDEX: remove an index (atomically)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..image import delete


def register(sub: Any) -> None:
    p = sub.add_parser(
        "delete", help="remove an index from an image file",
        description="Remove one index; the indices after it move down by one, as in WIM "
                    "files. The space is not reclaimed in place: `imagefs export IMAGE all "
                    "NEW` writes a compacted copy.",
        epilog="example: imagefs delete golden.imagefs old-build")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="wait at most this long for another writer (default: wait)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    number, entry = delete(args.image, args.index, wait=args.wait)
    print(f"deleted index {number} ({entry.name})", file=sys.stderr)
    return 0
