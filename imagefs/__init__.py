"""imagefs: many operating-system images in one deduplicated, compressed file."""

from .container import Commit, IndexEntry
from .errors import Error
from .image import Image, capture, delete
from .view import IndexView

__all__ = ["Commit", "Error", "Image", "IndexEntry", "IndexView", "capture", "delete"]
__version__ = "0.1.0"
