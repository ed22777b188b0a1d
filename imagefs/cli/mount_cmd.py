"""imagefs mount IMAGE INDEX MOUNTPOINT: serve an index read-only as a folder."""

from __future__ import annotations

import argparse
from typing import Any

from ..mounts import MountRecord, start
from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mount", help="mount an index read-only as a folder (FUSE)",
        description="Mount INDEX of IMAGE read-only at MOUNTPOINT, an existing directory. "
                    "The command returns once the mount is ready; a background process "
                    "serves it until `imagefs unmount`. The folder shows exactly what was "
                    "captured: owners, modes, times, hardlinks, xattrs, ACLs, holes. As "
                    "root the mount serves every user (allow_other, with the kernel "
                    "checking permissions) and keeps setuid files and device nodes "
                    "working (suid, dev), so `chroot MOUNTPOINT` behaves like the real "
                    "system.",
        epilog="Options (-o, comma-separated, may repeat): cache=SIZE bounds the cache of "
               "decompressed chunks (default 256M); any other option goes to FUSE "
               "(e.g. noatime, nosuid, nodev, noexec, allow_other). "
               "examples: imagefs mount golden.imagefs 1 /mnt/golden; "
               "imagefs mount golden.imagefs web /mnt/web -o cache=1G; "
               "imagefs mount golden.imagefs 2 /mnt/x --foreground  (logs to stderr, "
               "Ctrl-C unmounts; for debugging and systemd)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted or interrupted")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated (see below)")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def announce(rec: MountRecord) -> None:
        _say(rec, args.json, foreground=True)

    rec = start(args.image, args.index, args.mountpoint, args.options,
                foreground=args.foreground, announce=announce)
    if not args.foreground:
        _say(rec, args.json, foreground=False)
    return 0


def _say(rec: MountRecord, as_json: bool, foreground: bool) -> None:
    if as_json:
        print_json(rec.to_json())
    else:
        where = "" if foreground else f"; log {rec.log}"
        print(f"Mounted index {rec.index} ({rec.name}) of {rec.image} read-only at "
              f"{rec.mountpoint} (pid {rec.pid}{where}).")
        if not foreground:
            print(f"Unmount with: imagefs unmount {rec.mountpoint}")
    import sys
    sys.stdout.flush()
