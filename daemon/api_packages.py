"""The packages.* methods: offline package servicing, wrapping servicing.packages (list) and
the servicing transaction (add, remove: daemon.servicing_jobs)."""

from __future__ import annotations

from typing import Any

from .access import DIRECTORY, IMAGE, READ, check_path
from .calls import in_thread_as
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required
from .servicing_jobs import SERVICING, checked_paths, only_root, submit_change

INDEX = (int, str)


@method("packages.list", image=required(str), index=required(*INDEX))
async def list_(call: Call, image: str, index: int | str) -> Any:
    """The Debian packages of an index, read from its dpkg database without mounting, as
    `imagefs package list --json`."""
    from servicing.packages import list_packages

    path = await check_path("image", image, call.peer, READ, IMAGE)
    found = await in_thread_as(call.peer, list_packages, path, str(index))
    return {**found.to_json(), "image": image}


@method("packages.add", debs=required(list), repository=optional(str),
        defer_configure=optional(bool, default=False), **SERVICING)
async def add(call: Call, debs: list[Any], repository: str | None, defer_configure: bool,
              image: str | None, index: int | str | None, session: str | None,
              dry_run: bool, new_index: str | None, subscribe: bool) -> Any:
    """Job: install .debs (`debs`, absolute paths; dependencies also from the folder
    `repository`) with the image's own dpkg, as `imagefs package add`: in `index` of
    `image` (committed as one transaction, or as `new_index`), or in the caller's writable
    `session`.  Root only.  The result is the transaction's outcome."""
    from servicing.packages import PackageAdd

    only_root(call, "packages.add")
    paths = await checked_paths(call, "debs", debs)
    repo = (await check_path("repository", repository, call.peer, READ, DIRECTORY)
            if repository is not None else None)
    return await submit_change(
        call, "packages.add", image, index, session, dry_run, new_index,
        {"debs": debs, "repository": repository, "defer_configure": defer_configure},
        lambda: PackageAdd(paths, repo, defer_configure), subscribe)


@method("packages.remove", names=required(list), purge=optional(bool, default=False),
        with_dependents=optional(bool, default=False), **SERVICING)
async def remove(call: Call, names: list[Any], purge: bool, with_dependents: bool,
                 image: str | None, index: int | str | None, session: str | None,
                 dry_run: bool, new_index: str | None, subscribe: bool) -> Any:
    """Job: remove (or with `purge`, purge) packages with the image's own dpkg, as
    `imagefs package remove`; refused when others depend on them unless
    `with_dependents`.  Root only."""
    from servicing.packages import PackageRemove

    only_root(call, "packages.remove")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise RpcError(INVALID_PARAMS, "packages.remove: `names` must be a non-empty array "
                       "of package names")
    return await submit_change(
        call, "packages.remove", image, index, session, dry_run, new_index,
        {"names": names, "purge": purge, "with_dependents": with_dependents},
        lambda: PackageRemove(names, purge, with_dependents), subscribe)
