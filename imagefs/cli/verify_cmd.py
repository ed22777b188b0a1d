"""imagefs verify IMAGE: check every byte; exit 0 only when all is well."""

from __future__ import annotations

import argparse
import os
from typing import Any

from imagefs.errors import DamageFound
from imagefs.verify import verify

from ._common import add_json, human, print_json, progress


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify", help="check every chunk, record and digest of an image file",
        description="Read the whole file: header, root slots, every frame's checksums, "
                    "every chunk's xxh3-128 and SHA-256, every metadata record, and each "
                    "index's digest. Exit 0 only when all is well; otherwise list what is "
                    "broken and which indices and paths it affects, and exit 1.",
        epilog="example: imagefs verify golden.imagefs --json")
    p.add_argument("image", metavar="IMAGE")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with progress("verifying", not args.json) as bar:
        bar.total(os.path.getsize(args.image) if os.path.exists(args.image) else 0)
        report = verify(args.image, progress=bar.advance)
    if args.json:
        print_json(report.as_json())
    else:
        for note in report.notes:
            print(f"NOTE: {note}")
        for p in report.problems:
            print(f"BROKEN: {p.what}")
            if p.indices:
                print(f"  affects indices: {', '.join(map(str, p.indices))}")
            for path in p.paths:
                print(f"  affects path: {path}")
        print(f"checked {report.frames} frames ({human(report.checked_bytes)}), "
              f"{report.chunks} chunks, {report.records} records in {report.indices} "
              f"indices: " + ("OK" if report.ok else f"{len(report.problems)} problem(s)"))
    if not report.ok:
        raise DamageFound(args.image, len(report.problems))
    return 0
