"""imagefs mount IMAGE INDEX MOUNTPOINT: serve an index read-only as a folder."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from ..mounts import MountRecord, start
from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mount", help="mount an index read-only as a folder (FUSE)",
        description=textwrap.fill(
            "Mount INDEX of IMAGE read-only at MOUNTPOINT. The command returns once the "
            "mount is ready; a background process serves it until `imagefs unmount`. The "
            "folder shows exactly what was captured: owners, modes, times, hardlinks, "
            "xattrs, ACLs, holes. As root the mount serves every user (allow_other, with "
            "the kernel checking permissions) and keeps setuid files and device nodes "
            "working (suid, dev), so `chroot MOUNTPOINT` behaves like the real system.", 79),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""options for -o (comma-separated, -o may repeat):
  cache=SIZE      bound the cache of decompressed chunks (default 256M)
  anything else   passed to FUSE: noatime, nosuid, nodev, noexec, allow_other, ...

examples:
  imagefs mount golden.imagefs 1 /mnt/golden
  imagefs mount golden.imagefs bookworm-web /mnt/web -o cache=1G
  imagefs mount golden.imagefs 2 /mnt/x --foreground   # logs to stderr; Ctrl-C unmounts
  imagefs mounts; imagefs unmount /mnt/golden""")
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("index", metavar="INDEX", help="index number (from 1) or name")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
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
