"""imagefs cleanup --all | SESSION: discard stale sessions."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import NoSuchSession, SessionLive, UsageError
from imagefs.session.lifecycle import SessionInfo
from imagefs.session.mounts import cleanup

from ._common import add_json, print_json
from ._daemon import absolute, add_daemon_options, call, daemon_client


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cleanup", help="discard stale sessions and their staged changes",
        description="Discard stale sessions (writable mounts whose process died) and "
                    "their staging, like DISM's /Cleanup-Mountpoints. Their changes are "
                    "lost: `imagefs remount` or `imagefs commit` them first to keep them. "
                    "Live sessions are never touched. --all also clears what a killed "
                    "servicing verb (package, health, firstboot), push or pull left behind.",
        epilog="examples:\n  imagefs cleanup --all\n  imagefs cleanup 3f9a2c1e",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="SESSION", nargs="?",
                   help="a session id or its mount point")
    p.add_argument("--all", action="store_true", help="every stale session")
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.all == (args.target is not None):
        raise UsageError("cleanup needs --all or one SESSION (not both)")
    with daemon_client(args) as c:
        gone = cleanup(None if args.all else args.target) if c is None else \
            cleanup_through(c, args.target)
        if args.all:  # what killed servicing verbs, pushes and pulls left (this user's)
            from imagefs.store.scratch import cleanup_scratch

            cleanup_scratch()
            if c is None:  # the daemon clears its own servicing workspaces
                from servicing.transaction import cleanup_workspaces

                cleanup_workspaces()
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


def cleanup_through(c: Any, target: str | None) -> list[SessionInfo]:
    """cleanup by the daemon: the stale sessions (one, or all the caller's), discarded."""
    if target is not None and "/" in target:
        target = absolute(target)
    chosen = [s for s in call(c, "sessions.list")
              if target is None or target in (s["session"], s["mountpoint"])]
    if target is not None and not chosen:
        raise NoSuchSession(target)
    gone = []
    for s in chosen:
        if s["state"] == "live":
            if target is not None:
                raise SessionLive(s["session"], s["pid"], s["mountpoint"])
            continue
        call(c, "sessions.discard", session=s["session"])
        gone.append(SessionInfo(id=s["session"], image=s["image"], uuid="", index=s["index"],
                                name=s["name"], mountpoint=s["mountpoint"], pid=0,
                                created=s["created"], uid=s["owner"]))
    return gone
