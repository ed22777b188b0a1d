"""The imagefs daemon: a trio server on a Unix socket that owns sessions and jobs.

It may import servicing and the imagefs library, never imagefs.cli (which imports it for
`imagefs daemon` and the verbs' client side); servicing never imports it: its api_*.py
wrap library and servicing functions as methods.

Clients speak JSON-RPC 2.0, one message a line (docs/api.md lists every method).  The
public surface is below; the rest are private modules:

    protocol   the wire: framing, error codes
    peers      who the peer is (SO_PEERCRED, SO_PEERGROUPS)
    access     which paths a peer may name, and acting as it in a worker thread
    rpc        the method table and parameter checking
    state      the daemon's configuration and what every handler reaches
    jobs       long work in threads, with progress and cancellation
    limits     how many worker threads one client (one user's jobs) may hold
    calls      what the methods share (threads of the caller's quota, job answers)
    api_*      the methods (images, mounts, sessions, jobs)
    server     listening, connections, shutdown
    forkserver the warm process that forks mounts for the daemon
    client     Client (blocking) and AsyncClient (trio)
"""

from .client import DEFAULT_SOCKET, AsyncClient, Client, daemon_running, socket_path
from .protocol import RpcError

__all__ = ["DEFAULT_SOCKET", "AsyncClient", "Client", "RpcError", "daemon_running",
           "socket_path"]
