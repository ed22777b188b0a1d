"""imagefs cleanup --all | SESSION: discard stale sessions."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError
from ..mounts import cleanup
from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cleanup", help="discard stale sessions and their staged changes",
        description="Discard stale sessions (writable mounts whose process died) and "
                    "their staging, like DISM's /Cleanup-Mountpoints. Their changes are "
                    "lost: `imagefs remount` or `imagefs commit` them first to keep them. "
                    "Live sessions are never touched.",
        epilog="examples:\n  imagefs cleanup --all\n  imagefs cleanup 3f9a2c1e",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="SESSION", nargs="?",
                   help="a session id or its mount point")
    p.add_argument("--all", action="store_true", help="every stale session")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.all == (args.target is not None):
        raise UsageError("cleanup needs --all or one SESSION (not both)")
    gone = cleanup(None if args.all else args.target)
    if args.json:
        print_json([{"session": i.id, "image": i.image, "index": i.index,
                     "mountpoint": i.mountpoint} for i in gone])
    elif not gone:
        print("No stale sessions.")
    else:
        for i in gone:
            print(f"Discarded session {i.id} (index {i.index} ({i.name}) of {i.image}, "
                  f"was at {i.mountpoint}).")
    return 0
