"""imagefs gc s3://BUCKET/PREFIX: remove what no ref of a store reaches."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta
from typing import Any

from imagefs.errors import UsageError

from ._common import add_json, human, print_json
from ._store import add_store_options

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gc", help="remove the objects of a store that no index reaches",
        description="Remove the packs and bundles of a store that no ref reaches and that "
                    "are older than the grace period. Safe while other servers push: a push "
                    "writes its objects before its ref and makes every object it reuses "
                    "young again, so nothing a push in progress relies on is older than the "
                    "grace period (a push must finish within it, less an hour). Reads every "
                    "ref first; one that cannot be read stops gc before anything is removed. "
                    "See docs/store.md.",
        epilog="examples: imagefs gc s3://images/golden --dry-run; "
               "imagefs gc s3://images/golden --grace 7d")
    p.add_argument("store", metavar="s3://BUCKET/PREFIX")
    p.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    p.add_argument("--grace", default="24h", metavar="AGE",
                   help="spare unreached objects younger than this (default 24h; s, m, h, d)")
    add_store_options(p)
    add_json(p)
    p.set_defaults(func=run)


def grace_of(text: str) -> timedelta:
    m = re.fullmatch(r"(\d{1,7})([smhd])", text)
    if not m:
        raise UsageError(f"--grace {text}: a number and a unit (s, m, h, d), e.g. 24h")
    return timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])


def run(args: argparse.Namespace) -> int:
    from imagefs.store.gc import gc

    done = gc(args.store, args.endpoint, dry_run=args.dry_run, grace=grace_of(args.grace))
    if args.json:
        print_json({**done.to_json(), "dry_run": args.dry_run, "objects": done.removed})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name in done.removed:
        print(name)
    print(f"{args.store}: {done.refs} ref(s), {done.kept} object(s) reached; {verb} "
          f"{len(done.removed)} ({human(done.removed_bytes)}); {done.young} unreached "
          "but younger than the grace period", file=sys.stderr)
    return 0
