"""imagefs push IMAGE [INDEX,...|all] s3://BUCKET/PREFIX: indices into a shared store."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import add_json, human, print_json, progress
from ._store import add_store_options


def register(sub: Any) -> None:
    p = sub.add_parser(
        "push", help="upload indices to an S3 object store, sending only what it lacks",
        description="Upload the chosen indices of IMAGE to a store on any S3-compatible "
                    "object store (AWS S3, Ceph RGW, MinIO, SeaweedFS). Content goes as "
                    "packs named by their SHA-256, so what the store already holds, from "
                    "any image or site, is not sent again; then each index's metadata; "
                    "last, a small ref per index that makes it visible: a reader sees the "
                    "old index or the new one, never a half-pushed one. The bucket is "
                    "created when it is missing. Credentials come from the environment "
                    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE), never from "
                    "the command line. See docs/store.md.",
        epilog="examples: imagefs push golden.imagefs all s3://images/golden; "
               "imagefs push golden.imagefs web s3://images/golden "
               "--endpoint http://rgw.example:7480")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("selection", metavar="INDEX[,INDEX...]|all", nargs="?", default="all",
                   help="which indices (default: all)")
    p.add_argument("store", metavar="s3://BUCKET/PREFIX")
    add_store_options(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imagefs.store.push import push

    with progress("pushing", not args.json) as bar:
        done = push(args.image, args.selection, args.store, args.endpoint,
                    progress=bar.advance, on_total=bar.total)
    if args.json:
        print_json({"store": args.store, "indices": [d.to_json() for d in done]})
        return 0
    for d in done:
        print(f"pushed index {d.index} ({d.name}) to {args.store}: {d.packs_sent} of "
              f"{d.packs} packs sent, {human(d.bytes_sent)} in all", file=sys.stderr)
    return 0
