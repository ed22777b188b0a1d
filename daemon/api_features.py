"""The features.* methods: the systemd units of an index (servicing.features), listed from
the image without mounting, changed with the host's systemctl --root in servicing
transactions (daemon.servicing_jobs), and roles applied (servicing.roles)."""

from __future__ import annotations

from typing import Any

from .access import IMAGE, READ, check_path
from .calls import in_thread_as
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, required
from .servicing_jobs import SERVICING, only_root, submit_change

INDEX = (int, str)
MAX_UNITS = 1024


@method("features.list", image=required(str), index=required(*INDEX))
async def list_(call: Call, image: str, index: int | str) -> Any:
    """Every unit file of an index and its state, as `systemctl --root=MNT
    list-unit-files` reports it, read without mounting, as `imagefs feature list
    --json`."""
    from servicing.features import list_features

    path = await check_path("image", image, call.peer, READ, IMAGE)
    found = await in_thread_as(call.peer, list_features, path, str(index))
    return {**found.to_json(), "image": image}


async def _units(call: Call, verb: str, units: list[Any], image: str | None,
                 index: int | str | None, session: str | None, dry_run: bool,
                 new_index: str | None, subscribe: bool) -> Any:
    from servicing.features import FeatureChange, unit_names

    name = f"features.{verb}"
    only_root(call, name)
    if not units or len(units) > MAX_UNITS or not all(isinstance(u, str) for u in units):
        raise RpcError(INVALID_PARAMS, f"{name}: `units` must be a non-empty array of at "
                       f"most {MAX_UNITS} unit names")
    names = unit_names(units)
    return await submit_change(call, name, image, index, session, dry_run, new_index,
                               {"units": names}, lambda: FeatureChange(verb, names),
                               subscribe)


@method("features.enable", units=required(list), **SERVICING)
async def enable(call: Call, units: list[Any], image: str | None, index: int | str | None,
                 session: str | None, dry_run: bool, new_index: str | None,
                 subscribe: bool) -> Any:
    """Job: enable `units` with the host's `systemctl --root` in `index` of `image` (one
    transaction, or `new_index`) or in the caller's writable `session`, as `imagefs
    feature enable`; Debian's bookkeeping follows.  Root only."""
    return await _units(call, "enable", units, image, index, session, dry_run, new_index,
                        subscribe)


@method("features.disable", units=required(list), **SERVICING)
async def disable(call: Call, units: list[Any], image: str | None, index: int | str | None,
                  session: str | None, dry_run: bool, new_index: str | None,
                  subscribe: bool) -> Any:
    """Job: disable `units`, as `imagefs feature disable`; deb-systemd-helper's state is
    kept so that a reinstall of the package leaves them disabled.  Root only."""
    return await _units(call, "disable", units, image, index, session, dry_run, new_index,
                        subscribe)


@method("features.mask", units=required(list), **SERVICING)
async def mask(call: Call, units: list[Any], image: str | None, index: int | str | None,
               session: str | None, dry_run: bool, new_index: str | None,
               subscribe: bool) -> Any:
    """Job: mask `units` (a link to /dev/null in /etc/systemd/system), as `imagefs feature
    mask`.  Root only."""
    return await _units(call, "mask", units, image, index, session, dry_run, new_index,
                        subscribe)


@method("features.unmask", units=required(list), **SERVICING)
async def unmask(call: Call, units: list[Any], image: str | None, index: int | str | None,
                 session: str | None, dry_run: bool, new_index: str | None,
                 subscribe: bool) -> Any:
    """Job: lift the masks of `units` made in /etc or /run, as `imagefs feature unmask`.
    Root only."""
    return await _units(call, "unmask", units, image, index, session, dry_run, new_index,
                        subscribe)


@method("features.apply", role=required(str), **SERVICING)
async def apply(call: Call, role: str, image: str | None, index: int | str | None,
                session: str | None, dry_run: bool, new_index: str | None,
                subscribe: bool) -> Any:
    """Job: apply the role file `role` (an absolute path: packages to add and remove,
    units to enable, disable, mask and unmask) as one transaction, as `imagefs feature
    apply`.  Root only."""
    from servicing.roles import RoleApply, read_role

    only_root(call, "features.apply")
    path = await check_path("role", role, call.peer, READ)
    checked = await in_thread_as(call.peer, read_role, path)
    return await submit_change(call, "features.apply", image, index, session, dry_run,
                               new_index, {"role": role}, lambda: RoleApply(checked),
                               subscribe)
