"""imagefs mounts: what is mounted where."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.session.mounts import list_mounts

from ._common import add_json, human, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mounts", help="list imagefs mounts",
        description="List imagefs mounts and sessions: mount point, image, index, mode, "
                    "serving process, state and, for writable mounts, the session and the "
                    "bytes its staging takes. States: mounted (read-only); live (a "
                    "writable mount being served); stale (a session whose process died: "
                    "`imagefs remount` it, `imagefs commit` it, or `imagefs cleanup` it); "
                    "dead (a read-only mount whose process is gone: `imagefs unmount` "
                    "clears it); unregistered (mounted by another user or run directory).",
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
    rows = [("MOUNTPOINT", "IMAGE", "INDEX", "MODE", "PID", "STATE", "SESSION", "STAGED")]
    for m in found:
        index = f"{m.index} ({m.name})" if m.index else "?"
        rows.append((m.mountpoint, m.image, index, m.mode, str(m.pid or "-"), m.state,
                     m.session or "-", human(m.staged_bytes) if m.session else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
