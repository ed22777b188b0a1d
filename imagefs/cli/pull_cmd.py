"""imagefs pull s3://BUCKET/PREFIX INDEX[,...]|all LOCAL: indices from a store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import add_json, human, print_json, progress
from ._store import add_store_options


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pull", help="fetch indices from an S3 object store, downloading only what LOCAL lacks",
        description="Add the named indices of a store to LOCAL (created when missing), "
                    "downloading only the packs holding content LOCAL does not have; every "
                    "object is checked against its name (SHA-256) before it is used. All "
                    "the indices are added in one commit: a pull interrupted at any moment "
                    "leaves LOCAL as it was, and a new LOCAL appears whole or not at all. "
                    "INDEX is an index's name as pushed (`all`: every index the store "
                    "holds). See docs/store.md.",
        epilog="examples: imagefs pull s3://images/golden web site.imagefs; "
               "imagefs pull s3://images/golden all mirror.imagefs")
    p.add_argument("store", metavar="s3://BUCKET/PREFIX")
    p.add_argument("selection", metavar="INDEX[,INDEX...]|all")
    p.add_argument("dest", metavar="LOCAL")
    add_store_options(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imagefs.store.pull import pull

    with progress("pulling", not args.json) as bar:
        done = pull(args.store, args.selection, args.dest, args.endpoint,
                    progress=bar.advance, on_total=bar.total)
    if args.json:
        print_json(done.to_json())
        return 0
    print(f"pulled {', '.join(done.names)} into {args.dest} as index(es) "
          f"{', '.join(map(str, done.indices))}: {done.packs_fetched} pack(s), "
          f"{human(done.bytes_received)} downloaded", file=sys.stderr)
    return 0
