"""The filesystem a writable mount serves: the base index with the session's changes on top.

An inode the session never changed is read from the base index, under the number a
read-only mount would give it (its record's address).  The first change to it copies its
attributes into a StagedInode (never its content); the first write into a base file
copies only the chunks the write touches.  Inodes created in the session are numbered from
NEW_INO_BASE.  Numbers never change and are never reused, also across commits, so every
number the kernel holds stays valid; a number from NEW_INO_BASE up whose inode is gone is
unknown (ENOENT), never read as the address of a base record.

Commit (commit.py) must rewrite exactly the records that changed and the directories above
them.  So a change marks its inode dirty and every directory up to the root: the parent of
an inode is the directory the kernel reached it through (kernel lookups are exact-counted,
and dropped at forget), and an inode with several names has its parents found by one walk.

Every method either does what POSIX says or raises Refusal with the errno a local
filesystem would give; permissions are the kernel's (default_permissions).  Not
thread-safe: the FUSE loop calls it from one thread.

SessionTree is assembled here from one class per concern, each in its own module:

    reading.py     TreeReading    state, reads (attrs, lookup, read, xattrs), kernel refs
    changes.py     TreeChanges    copy on first change, dirty marking up to the root
    content.py     FileContent    write, copy-up, truncate, fallocate
    attributes.py  Attributes     setattr, extended attributes and ACLs
    namespace.py   Namespace      make, link, unlink, rmdir, rename

They are base classes of one object, not collaborators: a request finds its method
directly, with no extra call in between (lookup, getattr, read and write are the hot
paths).
"""

from __future__ import annotations

from .attributes import Attributes
from .namespace import Namespace
from .reading import Attrs, Counts

__all__ = ["Attrs", "Counts", "SessionTree"]


class SessionTree(Namespace, Attributes):
    """A writable mount's inode tree: the base index (an IndexTree) with the session's
    changes (StagedInodes, kept in a Staging) on top.

    `nodes` maps every inode the session created or changed to its StagedInode; any other
    number is a base record's.  `counts` are the index's totals as they now are; `lookups`,
    `parents` and `opened` are the kernel's references, which decide when a removed inode
    is freed and which directories a change marks dirty.  The methods are those of the
    FUSE requests (session/fuse.py) and commit's reads (commit.py); see the module for
    which class holds which."""
