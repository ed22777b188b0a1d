"""Where imagefs keeps what is not in an image: mount records (runtime) and sessions (state).

Root uses the system's directories; other users their own (XDG); tests and the daemon
point them elsewhere with IMAGEFS_RUN_DIR and IMAGEFS_STATE_DIR.  A module of its own so
that the CLI can name them without importing what uses them.
"""

from __future__ import annotations

import os


def run_dir() -> str:
    """Mount records and logs: gone at reboot, like the mounts they describe."""
    env = os.environ.get("IMAGEFS_RUN_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/imagefs"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "imagefs") if xdg else f"/tmp/imagefs-{os.geteuid()}"


def state_dir() -> str:
    """Where sessions live: on local disk, so that they survive a crash or a reboot."""
    env = os.environ.get("IMAGEFS_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/imagefs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "imagefs")
