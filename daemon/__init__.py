"""The imagefs daemon: a trio server on a Unix socket that owns sessions and jobs.

Clients speak JSON-RPC 2.0, one message a line (docs/api.md lists every method).  The
public surface is below; the rest are private modules:

    protocol   the wire: framing, error codes
    access     who the peer is (SO_PEERCRED) and which paths it may name
    rpc        the method table and parameter checking
    jobs       long work in threads, with progress and cancellation
    limits     how many worker threads one client (one user's jobs) may hold
    api_*      the methods (images, sessions, jobs)
    server     listening, connections, shutdown
    client     Client (blocking) and AsyncClient (trio)
"""

from .client import DEFAULT_SOCKET, AsyncClient, Client, daemon_running, socket_path
from .protocol import RpcError

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "Client", "RpcError", "daemon_running",
           "socket_path"]
