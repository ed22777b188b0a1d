"""The packages.* methods: offline package servicing, wrapping servicing.packages."""

from __future__ import annotations

from typing import Any

from .access import IMAGE, READ, check_path
from .calls import in_thread_as
from .rpc import Call, method, required

INDEX = (int, str)


@method("packages.list", image=required(str), index=required(*INDEX))
async def list_(call: Call, image: str, index: int | str) -> Any:
    """The Debian packages of an index, read from its dpkg database without mounting, as
    `imagefs package list --json`."""
    from servicing.packages import list_packages

    path = await check_path("image", image, call.peer, READ, IMAGE)
    found = await in_thread_as(call.peer, list_packages, path, str(index))
    return {**found.to_json(), "image": image}
