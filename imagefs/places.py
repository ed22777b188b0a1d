"""Where imagefs keeps what is not in an image: mount records (runtime) and sessions (state).

Root uses the system's directories; other users their own (XDG).  A user (and the tests)
may point them elsewhere with IMAGEFS_RUN_DIR and IMAGEFS_STATE_DIR; a program that
serves others (the daemon, its fork server's children) says where with use_run_dir() and
use_state_dir(), which win over the environment.  A module of its own so that the CLI can
name them without importing what uses them.
"""

from __future__ import annotations

import os

# Set by use_run_dir() / use_state_dir(): this process's choice, inherited by its forks.
_chosen: dict[str, str] = {}


def use_run_dir(path: str | None) -> str | None:
    """From now on run_dir() is path in this process and its forks (None: the default
    again, IMAGEFS_RUN_DIR or the user's); the choice it replaces."""
    return _choose("run", path)


def use_state_dir(path: str | None) -> str | None:
    """From now on state_dir() is path in this process and its forks (None: the default
    again, IMAGEFS_STATE_DIR or the user's); the choice it replaces."""
    return _choose("state", path)


def _choose(which: str, path: str | None) -> str | None:
    previous = _chosen.pop(which, None)
    if path:
        _chosen[which] = os.path.abspath(path)
    return previous


def run_dir() -> str:
    """Mount records and logs: gone at reboot, like the mounts they describe."""
    chosen = _chosen.get("run") or os.environ.get("IMAGEFS_RUN_DIR")
    if chosen:
        return chosen
    if os.geteuid() == 0:
        return "/run/imagefs"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "imagefs") if xdg else f"/tmp/imagefs-{os.geteuid()}"


def state_dir() -> str:
    """Where sessions live: on local disk, so that they survive a crash or a reboot."""
    chosen = _chosen.get("state") or os.environ.get("IMAGEFS_STATE_DIR")
    if chosen:
        return chosen
    if os.geteuid() == 0:
        return "/var/lib/imagefs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "imagefs")
