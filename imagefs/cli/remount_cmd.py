"""imagefs remount MOUNTPOINT|SESSION: serve a stale session again."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import SessionLive
from imagefs.mount.registry import MountRecord
from imagefs.session.lifecycle import find_session
from imagefs.session.mounts import start

from ._common import add_json
from ._daemon import absolute, add_daemon_options, call, daemon_client, refuse_with
from .mount_cmd import say_mounted, session_record


def register(sub: Any) -> None:
    p = sub.add_parser(
        "remount", help="mount a stale session again, with its changes",
        description="Mount a stale session (one whose mount process died) again at its "
                    "mount point, with every change its staging recorded (everything "
                    "fsynced, and all but the last moments of the rest), like DISM's "
                    "/Remount-Image.",
        epilog="example: imagefs mounts; imagefs remount /mnt/edit")
    p.add_argument("target", metavar="MOUNTPOINT|SESSION")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted or interrupted")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, as for mount")
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.foreground and not args.options:
        with daemon_client(args) as c:
            if c is not None:
                target = args.target if "/" not in args.target else absolute(args.target)
                s = call(c, "sessions.remount", session=target)
                say_mounted(session_record(s), args.json, foreground=False)
                return 0
    else:
        refuse_with(args, "--foreground or -o")
    info = find_session(args.target)
    if info.live():
        raise SessionLive(info.id, info.pid, info.mountpoint)

    def announce(rec: MountRecord) -> None:
        say_mounted(rec.to_json(), args.json, foreground=True)

    rec = start(info.image, str(info.index), info.mountpoint, args.options,
                foreground=args.foreground, announce=announce, session=info)
    if not args.foreground:
        say_mounted(rec.to_json(), args.json, foreground=False)
    return 0
