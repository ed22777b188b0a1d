"""imagefs: many operating-system images in one deduplicated, compressed file.

The public names are loaded on first use, so that `imagefs mount` or `imagefs info` do not
pay for importing the capture machinery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .container import Commit, IndexEntry
    from .errors import Error
    from .image import Image, capture, delete
    from .view import IndexView

__all__ = ["Commit", "Error", "Image", "IndexEntry", "IndexView", "capture", "delete"]
__version__ = "0.1.0"

_WHERE = {"Commit": "container", "IndexEntry": "container", "Error": "errors",
          "Image": "image", "capture": "image", "delete": "image", "IndexView": "view"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'imagefs' has no attribute {name!r}")
