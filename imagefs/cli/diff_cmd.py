"""imagefs diff IMAGE A B: what differs between two indices."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.diff import diff
from imagefs.image import Image

from ._common import add_json, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "diff", help="paths added, removed and changed between two indices",
        description="Compare index A with index B: paths only in B (added, 'A'), only in "
                    "A (removed, 'D'), and in both but different ('M', with what changed: "
                    "content, type, mode, owner, size, mtime, xattrs, target, rdev, nlink). "
                    "Unchanged subtrees are skipped by their digests.",
        epilog="example: imagefs diff golden.imagefs bookworm-minbase bookworm-web --summary")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--summary", action="store_true", help="only the counts")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Image.open(args.image) as img:
        d = diff(img.view(args.a), img.view(args.b))
    doc = d.as_json()
    if args.json:
        print_json(doc if not args.summary else {"summary": doc["summary"]})
        return 0
    if not args.summary:
        for path in d.added:
            print(f"A {path}")
        for path in d.removed:
            print(f"D {path}")
        for path, what in d.changed:
            print(f"M {path} ({', '.join(what)})")
    s = doc["summary"]
    assert isinstance(s, dict)
    print(f"{s['added']} added, {s['removed']} removed, {s['changed']} changed")
    return 0
