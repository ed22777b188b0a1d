"""imagefs capture SRC IMAGE --name NAME: a directory tree into a new index."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from imagefs.image import DEFAULT_LEVEL, CaptureResult, capture

from ._common import add_compact, add_json, add_wait, human, print_json, progress, waiting_note
from ._daemon import absolute, add_daemon_options, call, daemon_client, run_job


def register(sub: Any) -> None:
    p = sub.add_parser(
        "capture", help="capture a directory tree as a new index (creating IMAGE if needed)",
        description="Capture the directory SRC into IMAGE as a new index, with all Linux "
                    "metadata (owners, modes, times in ns, xattrs, ACLs, capabilities, "
                    "hardlinks, devices, sparse files). IMAGE is created if missing; "
                    "otherwise the index is appended and content already in IMAGE is not "
                    "stored again. Prints the new index number.",
        epilog="example: imagefs capture /srv/rootfs golden.imagefs --name bookworm-web "
               "--description 'nginx base'")
    p.add_argument("src", metavar="SRC", help="directory to capture")
    p.add_argument("image", metavar="IMAGE", help="image file (created if missing)")
    p.add_argument("--name", required=True, help="name of the new index (unique in IMAGE)")
    p.add_argument("--description", default="", help="free text shown by `info`")
    p.add_argument("--level", type=int,
                   help=f"zstd level 1-22 (default {DEFAULT_LEVEL}; with --compact 19)")
    add_compact(p, "a new IMAGE gets its packs, an existing one keeps its own")
    add_wait(p)
    add_json(p)
    add_daemon_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with progress("capturing", not args.json) as bar, daemon_client(args) as c:
        if c is not None:
            job = call(c, "images.capture", image=absolute(args.image),
                       source=absolute(args.src), name=args.name,
                       description=args.description, level=args.level,
                       compact=args.compact, subscribe=True)
            r = CaptureResult(**run_job(c, job, bar))
        else:
            r = capture(args.image, args.src, args.name, args.description, args.level,
                        progress=bar.advance, on_total=bar.total,
                        on_wait=waiting_note(args.image), wait=args.wait,
                        compact=args.compact)
    if args.json:
        print_json(asdict(r))
    else:
        print(r.index)
        import sys
        print(f"captured {r.files} files, {human(r.bytes)} as index {r.index} "
              f"({r.name}); new content {human(r.new_bytes)}, stored as "
              f"{human(r.stored_bytes)}", file=sys.stderr)
    return 0
