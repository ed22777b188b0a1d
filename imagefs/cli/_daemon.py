"""Verbs that change an image go through the daemon when one listens.

`--daemon` insists (an error if none answers), `--no-daemon` never asks, and with neither a
daemon at $IMAGEFS_SOCKET (or /run/imagefs/imagefs.sock) is used when it accepts the
connection.  Through the daemon the work is the daemon's job (in its history, with the
caller's uid), and the output is the same as without it.  This module is the CLI's, the
outermost layer: imagefs's library never imports the daemon.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imagefs.errors import DaemonRefused, Interrupted, SystemFailure, UsageError

if TYPE_CHECKING:
    from daemon.client import Client

    from ._common import Progress


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--daemon", dest="daemon", action="store_const", const=True, default=None,
                   help="go through the imagefs daemon ($IMAGEFS_SOCKET or "
                        "/run/imagefs/imagefs.sock); the default when one is listening")
    g.add_argument("--no-daemon", dest="daemon", action="store_const", const=False,
                   help="do the work in this process even if a daemon is listening")


@contextmanager
def daemon_client(args: argparse.Namespace) -> Iterator[Client | None]:
    """A connection to the daemon if this call should use one, else None."""
    if args.daemon is False:
        yield None
        return
    from daemon.client import Client, daemon_running, socket_path

    path = socket_path()
    if args.daemon is None and not daemon_running(path):
        yield None
        return
    try:
        c = Client(path)
    except OSError as e:
        raise SystemFailure(path, f"no imagefs daemon answers ({e.strerror}); start one "
                            "(`imagefs daemon`) or leave out --daemon") from None
    try:
        yield c
    finally:
        c.close()


def call(c: Client, method: str, **params: Any) -> Any:
    """One call; an error answer becomes the CLI's error (same message and exit code)."""
    from daemon.protocol import RpcError

    try:
        return c.call(method, **params)
    except RpcError as e:
        raise DaemonRefused(e.message, e.exit_code) from None
    except ConnectionError as e:
        raise SystemFailure(c.path, str(e)) from None


def run_job(c: Client, job: dict[str, Any], bar: Progress | None = None) -> Any:
    """Follow a job the daemon started to its end, drawing its progress; its result, or
    its error raised as the CLI's."""
    shown = 0

    def progressed(p: dict[str, Any]) -> None:
        nonlocal shown
        if bar is None:
            return
        if p.get("total"):
            bar.total(int(p["total"]))
        done = int(p.get("done") or 0)
        bar.advance(done - shown)
        shown = done

    try:
        end = c.wait_job(job["job"], on_progress=progressed)
    except ConnectionError as e:
        raise SystemFailure(c.path, f"{e}; job {job['job']} may still be running there "
                            "(see jobs.get)") from None
    except KeyboardInterrupt:
        call(c, "jobs.cancel", job=job["job"])
        raise
    if end.get("state") != "done":
        err = end.get("error") or {}
        data = err.get("data") or {}
        default = Interrupted if end.get("state") == "cancelled" else SystemFailure
        raise DaemonRefused(str(err.get("message") or end.get("state")),
                            int(data.get("exit_code", default.exit_code)),
                            str(data.get("output") or ""))
    return end.get("result")


def absolute(path: str) -> str:
    """The daemon's working directory is not the caller's: send absolute paths."""
    return os.path.abspath(path)


def refuse_with(args: argparse.Namespace, what: str) -> None:
    if args.daemon:
        raise UsageError(f"--daemon cannot be combined with {what}")
