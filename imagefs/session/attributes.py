"""An inode's attributes in a writable mount: setattr (chmod, chown, utimens, truncate) and
extended attributes, with POSIX ACLs kept consistent with the mode as ext4 keeps them
(acl.py).  Reading attributes is reading.py's; this is changing them.
"""

from __future__ import annotations

import errno
import stat
import time

from imagefs.format import layout as F
from imagefs.mount.tree import Refusal

from . import acl
from .content import FileContent
from .staging import StagedInode

XATTR_CREATE = 1
XATTR_REPLACE = 2


class Attributes(FileContent):
    """setattr and extended attributes.  It builds on FileContent because a setattr with
    a size is a truncate."""

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> StagedInode:
        node = self._own(ino)
        if size is not None:
            if node.kind == F.DIR:
                raise Refusal(errno.EISDIR, "is a directory")
            if node.kind != F.REG:
                raise Refusal(errno.EINVAL, "not a regular file")
            self.truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            access = dict(self.xattrs(ino)).get(acl.ACCESS)
            if access is not None:  # the ACL's owner, group class and other follow
                node.xattrs = sorted([(n, v) for n, v in self.xattrs(ino) if n != acl.ACCESS]
                                     + [(acl.ACCESS, acl.chmod(access, node.mode))])
        if uid is not None:
            node.uid = uid
        if gid is not None:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = atime_ns
        if mtime_ns is not None:
            node.mtime_ns = mtime_ns
        node.ctime_ns = ctime_ns if ctime_ns is not None else time.time_ns()
        self._changed(node)
        return node

    def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if not 0 < len(name) <= 255:
            raise Refusal(errno.ERANGE, "attribute name length")
        if len(value) > F.MAX_XATTR_VALUE:
            raise Refusal(errno.E2BIG, "attribute value too large")
        current = list(self.xattrs(ino))
        names = [n for n, _v in current]
        if flags & XATTR_CREATE and name in names:
            raise Refusal(errno.EEXIST, "attribute exists")
        if flags & XATTR_REPLACE and name not in names:
            raise Refusal(errno.ENODATA, "no such attribute")
        node = self._own(ino)
        keep = True
        if name == acl.DEFAULT and node.kind != F.DIR:
            raise Refusal(errno.EACCES, "a default ACL belongs to a directory")
        if name == acl.ACCESS:
            entries = acl.decode(value)
            if entries is None:
                raise Refusal(errno.EINVAL, "not a POSIX ACL")
            node.mode, equivalent = acl.mode_of(entries, node.mode)
            keep = not equivalent  # the mode says it all: no ACL is stored (as ext4)
        node.xattrs = sorted([(n, v) for n, v in current if n != name]
                             + ([(name, value)] if keep else []))
        node.ctime_ns = time.time_ns()
        self._changed(node)

    def remove_xattr(self, ino: int, name: bytes) -> None:
        current = self.xattrs(ino)
        if all(n != name for n, _v in current):
            raise Refusal(errno.ENODATA, "no such attribute")
        node = self._own(ino)
        node.xattrs = [(n, v) for n, v in current if n != name]
        node.ctime_ns = time.time_ns()
        self._changed(node)
