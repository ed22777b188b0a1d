"""imagefs info IMAGE [INDEX]: what the file holds (the commit record; --space: the records)."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import one_line
from imagefs.image import Image

from ._common import add_json, human, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info", help="list the indices and the file's dedup and compression savings",
        description="Show each index (number, name, description, creation time, file count, "
                    "logical bytes) and, for the file, its size on disk, unique stored "
                    "bytes, the dedup and compression ratios and the format version. "
                    "Reads only the header and the commit record, however large the image "
                    "(--space reads every index's records too).",
        epilog="example: imagefs info golden.imagefs 2 --json")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("index", metavar="INDEX", nargs="?", help="only this index")
    p.add_argument("--history", action="store_true", help="also show each index's history")
    p.add_argument("--space", action="store_true",
                   help="also read every index's records to say what each index's content "
                        "takes on disk and what no index uses any more (what `imagefs "
                        "optimize` would drop); costs about an `ls -R` of every index")
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with Image.open(args.image) as img:
        doc = img.describe(args.index, args.history)
        count = len(img.indices)
        if args.space:
            from imagefs.space import describe_space

            describe_space(img, doc)
    doc["image"] = args.image
    if args.json:
        print_json(doc)
        return 0
    size, logical = doc["size_on_disk"], doc["logical_bytes"]
    print(f"Image:           {args.image} (format {doc['format_version']}, "
          f"generation {doc['generation']})")
    print(f"Indices:         {count}")
    print(f"Size on disk:    {human(size)} ({size} bytes)")
    print(f"Logical bytes:   {human(logical)} in all indices")
    print(f"Unique content:  {human(doc['unique_bytes'])} in {doc['chunks']} chunks"
          + (f"  (dedup {doc['dedup_ratio']}x)" if doc["dedup_ratio"] else ""))
    print(f"Stored (zstd):   {human(doc['stored_bytes'])}"
          + (f"  (compression {doc['compression_ratio']}x)" if doc["compression_ratio"]
             else ""))
    if logical and size:
        print(f"Savings:         {100 * (1 - size / logical):.1f}% of the logical bytes")
    if args.space:
        print(f"Reclaimable:     {human(doc['reclaimable_bytes'])} in "
              f"{doc['reclaimable_chunks']} chunks no index uses (imagefs optimize drops "
              "them)")
    for e in doc["indices"]:
        print()
        print(f"Index:           {e['index']}")
        print(f"Name:            {e['name']}")
        print(f"Description:     {e['description']}")
        print(f"Created:         {e['created']}")
        print(f"Modified:        {e['modified']}")
        print(f"Files:           {e['files']} (and {e['dirs']} directories)")
        print(f"Bytes:           {human(e['bytes'])} ({e['bytes']} bytes)")
        if args.space:
            print(f"Stored:          {human(e['stored_bytes'])} for its "
                  f"{human(e['content_bytes'])} of distinct content (shared content counts "
                  "in each index)")
        print(f"Digest:          sha256:{e['digest']}")
        for h in e.get("history", []):
            extra = ", ".join(_detail(k, v) for k, v in h.items()
                              if k not in ("when", "uid", "user", "action"))
            print(f"  {h.get('when', '?')}  uid {h.get('uid', '?')}  "
                  f"{h.get('action', '?')}  {extra}")
    return 0


HISTORY_VALUE = 160  # characters of one value of a history entry shown (--json: all)


def _listed(value: Any) -> list[Any]:
    """value if it is a list, else nothing: a history entry is the image's, not ours."""
    return value if isinstance(value, list) else []


def _detail(key: str, value: Any) -> str:
    """One detail of a history entry, on one line: a servicing verb's paths summary as
    counts, packages as name=version, anything long cut short."""
    if key == "paths" and isinstance(value, dict):
        return one_line(f"paths +{value.get('added', 0)} -{value.get('removed', 0)} "
                        f"~{value.get('changed', 0)}")[:HISTORY_VALUE]
    if key == "result" and isinstance(value, dict):
        packages = [f"{p.get('package')}={p.get('version')}"
                    for what in ("added", "removed") for p in _listed(value.get(what))
                    if isinstance(p, dict) and "package" in p]
        if packages:
            verb = "added" if value.get("added") else "removed"
            return one_line(f"{verb} {' '.join(packages)}")[:HISTORY_VALUE * 4]
    text = one_line(f"{key}={value}")
    return text if len(text) <= HISTORY_VALUE else text[:HISTORY_VALUE - 1] + "…"
