"""Who is calling: the credentials the kernel recorded when a client connected.

The uid, gid and pid come from SO_PEERCRED (imagefs.mount.kernel.peer_credentials, shared
with a mount's control socket), the supplementary groups from SO_PEERGROUPS.  A module of
its own: the quotas (limits.py) and the path checks (access.py) both name a Peer.
"""

from __future__ import annotations

import pwd
import socket
import struct
from dataclasses import dataclass

from imagefs.mount.kernel import peer_credentials

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_GROUPS = 256  # getsockopt's buffer is at most 1024 bytes in Python


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def who(self) -> dict[str, object]:
        """The fields a history entry records about the caller."""
        return {"uid": self.uid, "user": self.user}


def peer_of(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded when the peer connected."""
    pid, uid, gid = peer_credentials(sock)
    groups: set[int] = {gid}
    try:
        graw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups.update(struct.unpack(f"{len(graw) // 4}I", graw[:len(graw) // 4 * 4]))
    except OSError:
        pass  # an old kernel: the primary group only
    return Peer(pid, uid, gid, frozenset(groups))
