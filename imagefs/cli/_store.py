"""What the verbs that speak to a store share: --endpoint, the cache, and opening IMAGE
when it is `s3://BUCKET/PREFIX` (ls, cat, apply, mount read an index straight from it)."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.image import Image


def add_store_options(p: Any) -> None:
    p.add_argument("--endpoint", metavar="URL",
                   help="the store's S3 endpoint (default: $IMAGEFS_S3_ENDPOINT, "
                        "$AWS_ENDPOINT_URL, else AWS S3); credentials and region come from "
                        "the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "AWS_PROFILE, AWS_DEFAULT_REGION")


def add_read_options(p: Any) -> None:
    """For a verb whose IMAGE may be a store: where its objects are cached."""
    g = p.add_argument_group("when IMAGE is a store (s3://BUCKET/PREFIX; INDEX is a name)")
    g.add_argument("--cache", metavar="DIR",
                   help="keep fetched objects here (default: $IMAGEFS_CACHE, else "
                        "/var/cache/imagefs/store for root, ~/.cache/imagefs/store)")
    g.add_argument("--cache-size", metavar="SIZE", default="2G",
                   help="keep at most this much of packs in the cache, oldest use evicted "
                        "first (default 2G; K, M, G suffixes)")
    add_store_options(g)


def open_image(args: argparse.Namespace) -> Image:
    """args.image: a file, or an index of a store (args.index names it)."""
    from imagefs.store.client import is_store_url

    if not is_store_url(args.image):
        return Image.open(args.image)
    from imagefs.mount.options import parse_size
    from imagefs.store.remote import open_store_index

    return open_store_index(args.image, args.index, args.endpoint, args.cache,
                            parse_size(args.cache_size))
