"""imagefs commit MOUNTPOINT|SESSION [--new-index NAME]: publish a session's changes."""

from __future__ import annotations

import argparse
import os
from typing import Any

from imagefs.session.commit_client import commit

from ._common import add_json, human, print_json
from ._daemon import absolute, add_daemon_options, call, daemon_client, run_job


def register(sub: Any) -> None:
    p = sub.add_parser(
        "commit", help="publish a writable mount's changes into the image",
        description="Publish the changes of a writable mount (a session) into its index, "
                    "atomically, and keep the mount: the session goes on from the "
                    "published state. Only what changed is written. If the index was "
                    "committed from elsewhere since the session opened, the commit is "
                    "refused (exit code 6) unless --new-index puts the changes into a new "
                    "index. A stale session (its mount process died) is committed directly.",
        epilog="""examples:
  imagefs commit /mnt/edit
  imagefs commit /mnt/edit --new-index bookworm-patched
  imagefs commit 3f9a2c1e          # a session by id (see imagefs mounts)""")
    p.add_argument("target", metavar="MOUNTPOINT|SESSION")
    p.add_argument("--new-index", metavar="NAME",
                   help="publish as a new index NAME; the original index stays as it was")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for another writer's lock (default: forever)")
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with daemon_client(args) as c:
        if c is not None:
            target = args.target if os.sep not in args.target else absolute(args.target)
            job = call(c, "sessions.commit", session=target, new_index=args.new_index)
            result = run_job(c, job)
            sid = str(result.pop("session"))
            mountpoint = next((s["mountpoint"] for s in call(c, "sessions.list")
                               if s["session"] == sid), "")
        else:
            info, result = commit(args.target, args.new_index, args.wait)
            sid, mountpoint = info.id, info.mountpoint
    if args.json:
        print_json({"session": sid, "mountpoint": mountpoint, **result})
    else:
        say_committed(result)
    return 0


def say_committed(result: dict[str, Any]) -> None:
    if not result.get("changed"):
        print(f"Nothing to commit: index {result.get('index')} ({result.get('name')}) "
              "already holds every change.")
        return
    print(f"Committed into index {result.get('index')} ({result.get('name')}): "
          f"{result.get('records')} records, {human(int(result.get('new_bytes') or 0))} of "
          "new content.")
