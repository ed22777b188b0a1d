"""imagefs health: being built (issue 14)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("health", help=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: 2)
