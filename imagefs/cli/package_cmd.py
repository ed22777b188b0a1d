"""imagefs package list IMAGE INDEX: the Debian packages of an index (DISM /Get-Packages)."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import one_line

from ._common import print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "package", help="the Debian packages of an index",
        description="Offline package servicing of a Debian index (as DISM's /Get-Packages). "
                    "`list` reads the index's own dpkg database straight from the image, "
                    "without mounting it.",
        epilog="example: imagefs package list golden.imagefs bookworm-web --json")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list", help="name, version, architecture and state of every package",
        description="List the packages of INDEX as its dpkg database records them: the "
                    "same packages `dpkg-query --admindir=MNT/var/lib/dpkg -W` shows on a "
                    "mount of the index, with their architecture and state (installed, "
                    "unpacked, config-files, ...). Nothing is mounted and nothing changes.",
        epilog="example: imagefs package list golden.imagefs 1 | grep openssh")
    ls.add_argument("image", metavar="IMAGE")
    ls.add_argument("index", metavar="INDEX")
    ls.add_argument("--json", action="store_true",
                    help="print {image, index, name, architecture, packages: [{package, "
                         "name, version, architecture, multi_arch, want, state}]}")
    ls.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from servicing.packages import list_packages

    found = list_packages(args.image, args.index)
    if args.json:
        print_json(found.to_json())
        return 0
    # The database is the image's: whatever a name holds is shown, never obeyed.
    rows = [(one_line(p.qualified_name(found.native)), one_line(p.version),
             one_line(p.architecture), p.state) for p in found.packages]
    widths = [max([len(h), *(len(r[i]) for r in rows)])
              for i, h in enumerate(("PACKAGE", "VERSION", "ARCH", "STATE"))]
    for row in [("PACKAGE", "VERSION", "ARCH", "STATE"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
