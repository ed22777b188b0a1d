"""imagefs: many operating-system images in one deduplicated, compressed file.

The library, in layers that only import downwards (pyproject.toml [tool.importlinter]):

    session/   writable mounts: sessions, staging, the copy-on-write tree, commit
    mount/     read-only mounts: the inode tree, the pyfuse3 adapter, mount processes
    image, capture, apply, export, verify, diff
               the operations on whole images and indices, used by the CLI, the daemon
               and (image) by mounts
    format/    the image file: byte layouts, container, packs, records, view, writer
    errors, places
               what every layer uses: the named errors, the run and state directories

cli/ is the outermost layer (it may import everything, the daemon included); the daemon
and servicing packages sit between it and this library, which imports neither.

The public names are imported on first use, not with the package: a command that needs
none of them (`imagefs mount` through the daemon, `imagefs mounts`) starts in half the
time.  So is `__version__`, read from the installed package's metadata (pyproject.toml
is the one place it is written; importlib.metadata alone costs a command 20 ms).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import Error

if TYPE_CHECKING:
    from imagefs.format.commit_record import Commit, IndexEntry
    from imagefs.format.view import IndexView

    from .image import Image, capture, delete

    __version__: str

__all__ = ["Commit", "Error", "Image", "IndexEntry", "IndexView", "capture", "delete"]

_HOME = {"Commit": "format.commit_record", "IndexEntry": "format.commit_record", "Image": "image",
         "delete": "image", "IndexView": "format.view"}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if name == "__version__":
        value: Any = _package_version()
    elif home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def _package_version() -> str:
    """The version in pyproject.toml: as installed, else (a source tree run without
    installing it) from the file itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagefs")
    except PackageNotFoundError:
        import tomllib

        project = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")
        try:
            with open(project, "rb") as fh:
                return str(tomllib.load(fh)["project"]["version"])
        except (OSError, ValueError, KeyError):
            return "unknown"


class _Package(types.ModuleType):
    """`imagefs.capture` is the function imagefs.image.capture, though a submodule has the
    same name: the import system's setting of the attribute to the submodule is ignored
    (the submodule is sys.modules["imagefs.capture"])."""

    @property
    def capture(self) -> Any:
        from .image import capture

        return capture

    @capture.setter
    def capture(self, submodule: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
