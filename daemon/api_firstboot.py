"""The firstboot.* methods: the first-boot queue of an index (servicing.firstboot), added to
and removed from as servicing transactions (daemon.servicing_jobs), and listed straight
from the image."""

from __future__ import annotations

from typing import Any

from .access import IMAGE, READ, check_path
from .calls import in_thread_as
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required
from .servicing_jobs import SERVICING, submit_change

MAX_SCRIPT = 1 << 20


@method("firstboot.add", script=required(str), name=optional(str, default="command"),
        origin=optional(str, default=""), **SERVICING)
async def add(call: Call, script: str, name: str, origin: str, image: str | None,
              index: int | str | None, session: str | None, dry_run: bool,
              new_index: str | None, subscribe: bool) -> Any:
    """Job: queue `script` (the text of a program, usually `#!/bin/sh`…) as the first-boot
    item `name`, after the queued ones, as `imagefs firstboot add`; the unit that runs
    the queue at the next boot is put in the image and enabled if it is not there."""
    from servicing.firstboot import FirstbootAdd, check_name, check_script

    data = script.encode()
    if len(data) > MAX_SCRIPT:
        raise RpcError(INVALID_PARAMS, f"firstboot.add: `script` is over {MAX_SCRIPT} bytes")
    check_name(name)
    check_script(data)
    return await submit_change(
        call, "firstboot.add", image, index, session, dry_run, new_index,
        {"name": name, "origin": origin}, lambda: FirstbootAdd(name, data, origin),
        subscribe)


@method("firstboot.remove", items=required(list), **SERVICING)
async def remove(call: Call, items: list[Any], image: str | None, index: int | str | None,
                 session: str | None, dry_run: bool, new_index: str | None,
                 subscribe: bool) -> Any:
    """Job: take queued items (ids or names) out of the queue, as `imagefs firstboot
    remove`; an item that already ran is history and is refused."""
    from servicing.firstboot import FirstbootRemove

    if not items or not all(isinstance(i, str) and i for i in items):
        raise RpcError(INVALID_PARAMS, "firstboot.remove: `items` must be a non-empty array "
                       "of item ids or names")
    return await submit_change(
        call, "firstboot.remove", image, index, session, dry_run, new_index,
        {"items": items}, lambda: FirstbootRemove(items), subscribe)


@method("firstboot.list", image=required(str), index=required(int, str))
async def list_(call: Call, image: str, index: int | str) -> Any:
    """Every item of the index's first-boot queue, queued and done, read from the image
    without mounting it, as `imagefs firstboot list --json`."""
    path = await check_path("image", image, call.peer, READ, IMAGE)
    return await in_thread_as(call.peer, _listed, path, str(index))


def _listed(path: str, index: str) -> dict[str, Any]:
    from imagefs.image import Image
    from servicing.firstboot import list_items
    from servicing.roots import IndexRoot

    with Image.open(path) as img:
        number, entry = img.select(index)
        items = list_items(IndexRoot(img.view(number)))
    return {"image": path, "index": number, "name": entry.name, "mount": None,
            "items": [i.to_json() for i in items],
            "pending": sum(1 for i in items if i.pending)}
