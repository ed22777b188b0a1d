"""imagefs unmount MOUNTPOINT: end a mount cleanly."""

from __future__ import annotations

import argparse
from typing import Any

from ..mounts import unmount
from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "unmount", help="unmount a mounted index",
        description="Unmount an imagefs mount and wait for its process to exit. A mount "
                    "still in use is left mounted, and the processes using it are named "
                    "(exit code 6); leave the folder, close the files, and try again.",
        epilog="example: imagefs unmount /mnt/golden")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rec = unmount(args.mountpoint)
    if args.json:
        print_json(rec.to_json())
    elif rec.index:
        print(f"Unmounted {rec.mountpoint} (index {rec.index} ({rec.name}) of {rec.image}).")
    else:
        print(f"Unmounted {rec.mountpoint}.")
    return 0
