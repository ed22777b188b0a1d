"""The generalize.* methods: strip an index of one machine's identity (servicing.generalize)
as a servicing transaction (daemon.servicing_jobs), and list the operations."""

from __future__ import annotations

from typing import Any

from imagefs.errors import UsageError

from .access import IMAGE, READ, check_path, path_param
from .calls import in_thread_as
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional
from .servicing_jobs import SERVICING, submit_change


def _operations(name: str, spec: str | None) -> None:
    """A bad `operations` spec, refused before any work, as the CLI refuses it."""
    from servicing.generalize import select

    try:
        select(spec)
    except UsageError as e:
        raise RpcError(INVALID_PARAMS, f"{name}: {e.message()}",
                       {"type": UsageError.__name__, "exit_code": UsageError.exit_code}
                       ) from None


@method("generalize.run", operations=optional(str), **SERVICING)
async def run(call: Call, operations: str | None, image: str | None,
              index: int | str | None, session: str | None, dry_run: bool,
              new_index: str | None, subscribe: bool) -> Any:
    """Job: generalize `index` of `image` (or the caller's writable `session`) as
    `imagefs generalize`: the operations `operations` chooses (virt-sysprep's syntax,
    e.g. "-ssh-hostkeys" or "+ssh-userdir"; default: the default ones) remove or change
    exactly the paths their plan lists, and the result is committed (or as `new_index`).
    The result is the transaction's outcome: each index's plan (every path, with sizes)
    and what each operation removed."""
    from servicing.generalize import Generalize

    _operations("generalize.run", operations)
    return await submit_change(
        call, "generalize.run", image, index, session, dry_run, new_index,
        {"operations": operations}, lambda: Generalize(operations), subscribe)


@method("generalize.list", operations=optional(str), image=optional(str),
        index=optional(int, str))
async def list_(call: Call, operations: str | None, image: str | None,
                index: int | str | None) -> Any:
    """The generalize operations, in the order they run: name, what it does, whether it
    runs by default, whether `operations` chooses it, the paths it looks at; with `image`
    and `index`, also what each finds in that index (`found`: paths and bytes), read
    without mounting it.  As `imagefs generalize --list --json`."""
    from servicing.generalize import listing

    _operations("generalize.list", operations)
    doc: dict[str, Any] = {"operations": listing(operations), "image": None, "index": None,
                           "name": None, "found": None}
    if (image is None) != (index is None):
        raise RpcError(INVALID_PARAMS, "generalize.list: give both `image` and `index`, "
                       "or neither")
    if image is not None:
        path_param("image", image)
        path = await check_path("image", image, call.peer, READ, IMAGE)
        doc.update(await in_thread_as(call.peer, _survey, path, str(index)), image=path)
    return doc


def _survey(path: str, index: str) -> dict[str, Any]:
    from servicing.generalize import survey

    return survey(path, index)
