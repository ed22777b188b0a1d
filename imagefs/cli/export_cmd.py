"""imagefs export IMAGE INDEX[,INDEX...]|all DEST: a compacted copy of chosen indices."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from imagefs.export import export
from imagefs.image import DEFAULT_LEVEL

from ._common import add_json, add_recompress, print_json, progress
from ._daemon import absolute, add_daemon_options, call, daemon_client, run_job


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="copy chosen indices into another image file, compacted",
        description="Write the chosen indices into DEST holding only the content they "
                    "reference. Packs they use whole are copied as stored (their frame "
                    "checksums checked on the way; --check also checks every chunk); the "
                    f"chunks of partly used packs are repacked at level {DEFAULT_LEVEL}, "
                    "and --level recompresses everything. Indices keep their names, "
                    "descriptions, creation times, history and digests. A new DEST appears "
                    "whole or not at all; an existing DEST gets the indices appended.",
        epilog="examples: imagefs export golden.imagefs 2 web.imagefs; "
               "imagefs export golden.imagefs 1,bookworm-web pair.imagefs --level 15; "
               "imagefs export golden.imagefs all compacted.imagefs")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("selection", metavar="INDEX[,INDEX...]|all")
    p.add_argument("dest", metavar="DEST")
    add_recompress(p)
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with progress("exporting", not args.json) as bar, daemon_client(args) as c:
        if c is not None:
            job = call(c, "images.export", image=absolute(args.image), index=args.selection,
                       dest=absolute(args.dest), level=args.level, compact=args.compact,
                       check=args.check, subscribe=True)
            numbers = run_job(c, job, bar)["indices"]
        else:
            numbers = export(args.image, args.selection, args.dest, args.level,
                             progress=bar.advance, on_total=bar.total, compact=args.compact,
                             check=args.check)
    if args.json:
        print_json({"dest": args.dest, "indices": numbers})
    else:
        print(f"exported to {args.dest} as index(es) {', '.join(map(str, numbers))}",
              file=sys.stderr)
    return 0
