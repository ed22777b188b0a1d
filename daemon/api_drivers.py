"""The drivers.* methods: kernel modules and firmware matched to hardware, wrapping
servicing.driver_check and servicing.driver_list (check, list: answered at once, read as
the caller) and the servicing transaction (add, remove: daemon.servicing_jobs, root only,
since they run the image's own depmod)."""

from __future__ import annotations

from typing import Any

from .access import DIRECTORY, IMAGE, READ, check_path
from .calls import in_thread_as
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required
from .servicing_jobs import SERVICING, checked_paths, only_root, submit_change

INDEX = (int, str)
MAX_NAMES = 1000


@method("drivers.check", image=required(str), index=required(*INDEX),
        hardware=required(list), repository=optional(str))
async def check(call: Call, image: str, index: int | str, hardware: list[Any],
                repository: str | None) -> Any:
    """For each hardware inventory (`hardware`: absolute paths of their JSON files), each
    kernel of the index and each device: the module that would bind it and its firmware,
    and with `repository` which of its modules would cover it, as `imagefs driver check
    --json` (`ok` false: a device without a driver or firmware).  Read without mounting."""
    from servicing.driver_check import check as check_index

    path = await check_path("image", image, call.peer, READ, IMAGE)
    files = await checked_paths(call, "hardware", hardware)
    repo = (await check_path("repository", repository, call.peer, READ, DIRECTORY)
            if repository is not None else None)
    report = await in_thread_as(call.peer, check_index, path, str(index), None, files, repo)
    return {**report.to_json(), "image": image}


@method("drivers.list", image=required(str), index=required(*INDEX),
        all=optional(bool, default=False))
async def list_(call: Call, image: str, index: int | str, all: bool) -> Any:
    """The out-of-box drivers of each kernel of the index (with `all`, every module), with
    version, aliases, firmware and where `driver add` took them from, as `imagefs driver
    list --json`."""
    from servicing.driver_list import drivers_of

    path = await check_path("image", image, call.peer, READ, IMAGE)
    found = await in_thread_as(call.peer, drivers_of, path, str(index), None, all)
    return {**found.to_json(), "image": image}


@method("drivers.add", repository=optional(str), hardware=optional(list, default=[]),
        model=optional(str), all=optional(bool, default=False),
        paths=optional(list, default=[]), recurse=optional(bool, default=False),
        initramfs=optional(bool, default=False),
        missing_firmware_ok=optional(bool, default=False), **SERVICING)
async def add(call: Call, repository: str | None, hardware: list[Any], model: str | None,
              all: bool, paths: list[Any], recurse: bool, initramfs: bool,
              missing_firmware_ok: bool, image: str | None, index: int | str | None,
              session: str | None, dry_run: bool, new_index: str | None,
              subscribe: bool) -> Any:
    """Job: install kernel modules into every kernel of the index, as `imagefs driver
    add`: from `repository` those matching the devices of the inventories `hardware`, or
    its `model` folder, or `all`; or the module files and folders `paths` (`recurse`).
    Their dependencies and firmware come along; the image's own depmod runs (and with
    `initramfs` its update-initramfs).  Root only."""
    from servicing.drivers import DriverAdd, Selection

    only_root(call, "drivers.add")
    hw = await checked_paths(call, "hardware", hardware) if hardware else []
    files = await checked_paths(call, "paths", paths) if paths else []
    repo = (await check_path("repository", repository, call.peer, READ, DIRECTORY)
            if repository is not None else None)
    sel = Selection(repo, hw, model, all, files, recurse).check()
    params = {"repository": repository, "hardware": hardware, "model": model, "all": all,
              "paths": paths, "recurse": recurse, "initramfs": initramfs,
              "missing_firmware_ok": missing_firmware_ok}
    return await submit_change(
        call, "drivers.add", image, index, session, dry_run, new_index, params,
        lambda: DriverAdd(sel, initramfs, missing_firmware_ok), subscribe)


@method("drivers.remove", names=required(list), initramfs=optional(bool, default=False),
        **SERVICING)
async def remove(call: Call, names: list[Any], initramfs: bool, image: str | None,
                 index: int | str | None, session: str | None, dry_run: bool,
                 new_index: str | None, subscribe: bool) -> Any:
    """Job: remove modules `driver add` added (module names), with the firmware no other
    added module needs, and run the image's own depmod (and with `initramfs` its
    update-initramfs), as `imagefs driver remove`.  Root only."""
    from servicing.driver_remove import DriverRemove

    only_root(call, "drivers.remove")
    if (not names or len(names) > MAX_NAMES
            or not all(isinstance(n, str) and n for n in names)):
        raise RpcError(INVALID_PARAMS, "drivers.remove: `names` must be a non-empty array "
                       "of module names")
    return await submit_change(
        call, "drivers.remove", image, index, session, dry_run, new_index,
        {"names": names, "initramfs": initramfs}, lambda: DriverRemove(names, initramfs),
        subscribe)
