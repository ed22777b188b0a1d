"""What the verbs that speak to a store share: --endpoint."""

from __future__ import annotations

from typing import Any


def add_store_options(p: Any) -> None:
    p.add_argument("--endpoint", metavar="URL",
                   help="the store's S3 endpoint (default: $IMAGEFS_S3_ENDPOINT, "
                        "$AWS_ENDPOINT_URL, else AWS S3); credentials and region come from "
                        "the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                        "AWS_PROFILE, AWS_DEFAULT_REGION")

