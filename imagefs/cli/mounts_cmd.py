"""imagefs mounts: what is mounted where."""

from __future__ import annotations

import argparse
from typing import Any

from ..mounts import list_mounts
from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mounts", help="list imagefs mounts",
        description="List imagefs mounts: mount point, image, index, mode, serving process "
                    "and state (mounted; dead = its process is gone and the folder answers "
                    "'Transport endpoint is not connected': `imagefs unmount` clears it; "
                    "unregistered = mounted by another user or run directory).",
        epilog="example: imagefs mounts --json | jq -r '.[].mountpoint'")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    found = list_mounts()
    if args.json:
        print_json([m.to_json() for m in found])
        return 0
    if not found:
        print("No imagefs mounts.")
        return 0
    rows = [("MOUNTPOINT", "IMAGE", "INDEX", "MODE", "PID", "STATE")]
    for m in found:
        index = f"{m.index} ({m.name})" if m.index else "?"
        rows.append((m.mountpoint, m.image, index, m.mode, str(m.pid or "-"), m.state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
