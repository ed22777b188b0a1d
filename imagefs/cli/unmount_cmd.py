"""imagefs unmount MOUNTPOINT [--commit [--new-index NAME] | --discard]: end a mount."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import UsageError
from imagefs.mount.registry import record_for
from imagefs.session.mounts import unmount

from ._common import add_json, print_json
from ._daemon import add_daemon_options, call, daemon_client, run_job
from .commit_cmd import say_committed


def register(sub: Any) -> None:
    p = sub.add_parser(
        "unmount", help="unmount a mounted index",
        description="Unmount an imagefs mount and wait for its process to exit. A mount "
                    "still in use is left mounted, and the processes using it are named "
                    "(exit code 6); leave the folder, close the files, and try again. A "
                    "writable mount needs --commit (publish its changes, then end the "
                    "session) or --discard (drop them with the session), as DISM's "
                    "/Unmount-Image does.",
        epilog="""examples:
  imagefs unmount /mnt/golden
  imagefs unmount /mnt/edit --commit
  imagefs unmount /mnt/edit --commit --new-index bookworm-patched
  imagefs unmount /mnt/edit --discard""")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--commit", action="store_true",
                      help="writable mounts: publish the changes, then unmount")
    what.add_argument("--discard", action="store_true",
                      help="writable mounts: unmount and drop the changes")
    p.add_argument("--new-index", metavar="NAME",
                   help="with --commit: publish as a new index NAME (the original stays)")
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.new_index is not None and not args.commit:
        raise UsageError("--new-index goes with --commit")
    rec, result = None, None
    mine = record_for(args.mountpoint)
    if mine is not None and mine.mode == "rw" and (args.commit or args.discard):
        with daemon_client(args) as c:
            if c is not None:  # a session: the daemon commits and ends it
                rec, result = mine, None
                if args.commit:
                    result = run_job(c, call(c, "sessions.commit", session=mine.session,
                                             new_index=args.new_index))
                    result.pop("session", None)
                call(c, "sessions.discard", session=mine.session)
    if rec is None:
        rec, result = unmount(args.mountpoint, commit=args.commit,
                              discard_changes=args.discard, new_index=args.new_index)
    if args.json:
        print_json({**rec.to_json(), "commit": result})
        return 0
    if result is not None:
        say_committed(result)
    what = f" (index {rec.index} ({rec.name}) of {rec.image})" if rec.index else ""
    ended = ""
    if rec.session:  # what was not committed is gone with the session
        ended = f"; session {rec.session} " + ("discarded" if args.discard else "ended")
    print(f"Unmounted {rec.mountpoint}{what}{ended}.")
    return 0
