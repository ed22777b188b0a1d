"""imagefs daemon: run the service that socket clients (and the CLI, with --daemon) use.

The CLI is the outermost layer: this verb imports the daemon package; nothing else in
imagefs/ does (the dependency direction is daemon → servicing → imagefs).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

# syslog priorities for sd-daemon(3) line prefixes: journald files each line by them.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """`<6>message`: journald reads the priority; a terminal still reads the text."""

    def format(self, record: logging.LogRecord) -> str:
        prio = PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def register(sub: Any) -> None:
    p = sub.add_parser(
        "daemon", help="run the imagefs service on a Unix socket (in the foreground)",
        description="Serve JSON-RPC 2.0 clients (one message a line; see docs/api.md) on a "
                    "Unix socket: images.* (info, capture, export, verify, delete, diff), "
                    "sessions.* (writable mounts to commit or discard), jobs.* (progress, "
                    "cancel, wait). Root and members of --group are served; each caller "
                    "acts with its own permissions on the paths it names. Runs in the "
                    "foreground and logs to stderr (journald priorities); under systemd it "
                    "takes the listening socket from socket activation (contrib/imagefs."
                    "socket). SIGTERM stops it cleanly: running commits finish, other jobs "
                    "are rolled back, its mounts are saved and unmounted.",
        epilog="example: imagefs daemon --group imagefs    then: imagefs capture /srv/tree "
               "golden.imagefs --name base --daemon")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="where to listen (default $IMAGEFS_SOCKET or "
                        "/run/imagefs/imagefs.sock); ignored with socket activation")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="where sessions keep their staging (default $IMAGEFS_STATE_DIR or "
                        "/var/lib/imagefs)")
    p.add_argument("--group", metavar="NAME", default=None,
                   help="members of this group may use the daemon (besides root); the socket "
                        "is made 0660 and given to it")
    p.add_argument("--threads", type=int, default=4, metavar="N",
                   help="jobs that run at once (default 4); jobs on one image run in order")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from daemon.client import socket_path
    from daemon.server import Config, serve
    from imagefs.errors import UsageError

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    config = Config(socket_path=args.socket or socket_path(), state_dir=args.state_dir,
                    group=args.group, threads=args.threads)
    try:
        trio.run(serve, config)
    except ValueError as e:  # a bad --group
        raise UsageError(str(e)) from None
    return 0
