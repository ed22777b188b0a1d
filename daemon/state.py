"""The daemon's configuration and the state every method handler reaches through its Call.

A module of its own so that the method table (rpc.py) can name the daemon without naming
the server that runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .client import DEFAULT_SOCKET
from .forkserver import MountForkServer
from .jobs import SHUTDOWN_GRACE, JobManager
from .limits import CLIENT_THREADS, SHARED_THREADS, Quotas
from .protocol import SHUTTING_DOWN, RpcError

LINE_TIMEOUT = 30.0      # a started line must be finished within this
SEND_TIMEOUT = 10.0      # a reply the client does not take within this drops it
MAX_CONNECTIONS = 4096


@dataclass
class Config:
    socket_path: str = DEFAULT_SOCKET
    state_dir: str | None = None
    group: str | None = None
    threads: int = 4                  # jobs that run at once
    jobs_per_user: int | None = None  # of those, one user's (default: threads - 1, >= 1)
    client_threads: int = CLIENT_THREADS  # quick requests of one client at once
    shared_threads: int = SHARED_THREADS  # quick requests of all clients at once
    line_timeout: float = LINE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    shutdown_grace: float = SHUTDOWN_GRACE


@dataclass
class Daemon:
    """The state every handler can reach through its Call."""

    config: Config
    group_gid: int | None
    jobs: JobManager
    fork_server: MountForkServer
    quotas: Quotas = field(default_factory=Quotas)
    started: float = field(default_factory=time.time)
    connections: int = 0
    stopping: bool = False

    def check_accepting(self) -> None:
        if self.stopping:
            raise RpcError(SHUTTING_DOWN, "the daemon is shutting down; try again when it "
                           "is back")
