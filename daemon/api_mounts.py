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
        run_dir=optional(str))
async def open_mount(call: Call, image: str, index: int | str, mountpoint: str,
                     options: list[Any], run_dir: str | None) -> Any:
    """Mount `index` of `image` read-only at `mountpoint` (an existing directory), as the
    caller; returns the mount's record once the folder answers.  `options` are `-o`
    values; `run_dir` is where the caller's `imagefs mounts` keeps records (default: the
    caller's default)."""
    call.daemon.check_accepting()
    # The mount takes the caller's credentials before it touches a path, so the kernel
    # checks them, and errors are word for word those of the caller's own mount.
    for name, path in (("image", image), ("mountpoint", mountpoint), ("run_dir", run_dir)):
        if path is not None:
            path_param(name, path)
    if not all(isinstance(o, str) and "\0" not in o for o in options):
        raise RpcError(INVALID_PARAMS, "mounts.open: `options` must be an array of strings "
                       "(without NUL)")
    peer = call.peer
    request = MountRequest(image=image, index=str(index), mountpoint=mountpoint,
                           options=list(options), uid=peer.uid, gid=peer.gid,
                           groups=sorted(peer.groups), run_dir=run_dir)
    return await in_thread(call.daemon.fork_server.mount, request)
