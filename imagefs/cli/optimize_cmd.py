"""imagefs optimize IMAGE: the image file rewritten in place with only what its indices use."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import add_json, add_recompress, add_wait, human, print_json, progress
from ._daemon import absolute, add_daemon_options, call, daemon_client, run_job


def register(sub: Any) -> None:
    p = sub.add_parser(
        "optimize", help="rewrite an image file in place without unused content",
        description="Rewrite IMAGE holding only the content its indices reference, as wimoptimize "
                    "does: what `delete` and many commits left behind is dropped. Packs the "
                    "indices use whole are copied as stored (their frame checksums checked on the "
                    "way; --check also checks every chunk); the chunks of partly used packs are "
                    "repacked, and --level recompresses everything. The new file is built beside "
                    "the old one and takes its name in one rename: killed at any moment, IMAGE is "
                    "the old file or the new one, whole. Indices keep their numbers, names, "
                    "history and digests; the file's mode and owner stay. Refused while the image "
                    "has sessions (writable mounts, or ones waiting for their commit): commit or "
                    "discard them first. Read-only mounts go on reading the old file until they "
                    "are unmounted. Exit codes: 6 sessions open or the lock held past --wait, 4 a "
                    "damaged pack or record (the file is left as it was), 8 no space.",
        epilog="examples: imagefs optimize golden.imagefs; "
               "imagefs optimize golden.imagefs --level 19 --json")
    p.add_argument("image", metavar="IMAGE")
    add_recompress(p)
    add_wait(p)
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imagefs.optimize import optimize  # not at the top: the daemon path needs none of it

    with progress("optimizing", not args.json) as bar, daemon_client(args) as c:
        if c is not None:
            job = call(c, "images.optimize", image=absolute(args.image), level=args.level,
                       compact=args.compact, check=args.check, subscribe=True)
            doc = run_job(c, job, bar)
        else:
            doc = optimize(args.image, args.level, progress=bar.advance, on_total=bar.total,
                           wait=args.wait, compact=args.compact, check=args.check).to_json()
    if args.json:
        print_json(doc)
    else:
        print(f"optimized {args.image}: {human(doc['size_before'])} -> "
              f"{human(doc['size_after'])} ({doc['indices']} indices)", file=sys.stderr)
    return 0
