"""mounts.*: read-only mounts, started by the daemon's warm fork server.

What `imagefs mount` does is done here too, only without its cost of importing pyfuse3 and
trio: the daemon's fork server (daemon.forkserver) forks a mount, which takes the caller's
uid, gid and groups before it touches a path, so the kernel decides as it would for the
caller's own `imagefs mount` (a non-root caller's mount goes through fusermount3 and is
theirs to unmount).  The mount process is its own: it outlives the call and the daemon.
"""

from __future__ import annotations

from typing import Any

from .access import path_param
from .calls import in_thread
from .forkserver import MountRequest
from .protocol import INVALID_PARAMS, RpcError
from .rpc import Call, method, optional, required


@method("mounts.open", image=required(str), index=required(int, str),
        mountpoint=required(str), options=optional(list, default=[]),
        run_dir=optional(str), cache=optional(str),
        cache_size=optional(int, minimum=1 << 20, maximum=1 << 50))
async def open_mount(call: Call, image: str, index: int | str, mountpoint: str,
                     options: list[Any], run_dir: str | None, cache: str | None,
                     cache_size: int | None) -> Any:
    """Mount `index` of `image` read-only at `mountpoint` (an existing directory), as the
    caller; returns the mount's record once the folder answers.  `options` are `-o`
    values; `run_dir` is where the caller's `imagefs mounts` keeps records (default: the
    caller's default).  `image` may be an index of a store (s3://BUCKET/PREFIX, `index`
    its name; the daemon's S3 credentials): its objects are kept in `cache` (default the
    caller's ~/.cache/imagefs/store, /var/cache/imagefs/store for root), at most
    `cache_size` bytes of packs (default 2 GiB)."""
    from imagefs.store.client import is_store_url, parse_url

    call.daemon.check_accepting()
    # The mount takes the caller's credentials before it touches a path, so the kernel
    # checks them, and errors are word for word those of the caller's own mount.
    store = is_store_url(image)
    if store:
        parse_url(image)
    paths = (("mountpoint", mountpoint), ("run_dir", run_dir), ("cache", cache),
             *(() if store else (("image", image),)))
    for name, path in paths:
        if path is not None:
            path_param(name, path)
    if not all(isinstance(o, str) and "\0" not in o for o in options):
        raise RpcError(INVALID_PARAMS, "mounts.open: `options` must be an array of strings "
                       "(without NUL)")
    peer = call.peer
    request = MountRequest(image=image, index=str(index), mountpoint=mountpoint,
                           options=list(options), uid=peer.uid, gid=peer.gid,
                           groups=sorted(peer.groups), run_dir=run_dir, cache=cache,
                           cache_size=cache_size)
    return await in_thread(call.daemon.fork_server.mount, request)
