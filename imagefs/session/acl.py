"""POSIX ACLs as a writable mount must keep them: in step with the mode, and inherited.

Under FUSE the kernel enforces ACLs (FUSE_POSIX_ACL) but leaves the filesystem to do what
ext4's ACL code does for it: setting an access ACL sets the mode's permission bits (and an
ACL the mode can express is not stored at all), chmod rewrites the ACL's owner, group (or
mask) and other entries, and a new inode in a directory with a default ACL gets that ACL,
masked by the mode it was created with, instead of the umask.  These follow the kernel's
posix_acl_equiv_mode, posix_acl_chmod and posix_acl_create.

The xattr value (system.posix_acl_access / _default): u32 version 2, then 8-byte entries
(u16 tag, u16 perm, u32 id), little-endian.
"""

from __future__ import annotations

import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
VERSION = 2
_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

Entry = tuple[int, int, int]  # tag, perm, id


def decode(value: bytes) -> list[Entry] | None:
    """The entries, or None if value is not an ACL this module understands."""
    if len(value) < 4 or (len(value) - 4) % 8 or _HEAD.unpack_from(value)[0] != VERSION:
        return None
    return [_ENTRY.unpack_from(value, 4 + 8 * i) for i in range((len(value) - 4) // 8)]


def encode(entries: list[Entry]) -> bytes:
    return _HEAD.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def _group_class(entries: list[Entry]) -> int:
    """The index of the entry the mode's group bits mirror: the mask if any."""
    for i, (tag, _p, _id) in enumerate(entries):
        if tag == MASK:
            return i
    for i, (tag, _p, _id) in enumerate(entries):
        if tag == GROUP_OBJ:
            return i
    return -1


def mode_of(entries: list[Entry], mode: int) -> tuple[int, bool]:
    """(the mode an access ACL gives, whether the mode alone expresses the ACL)."""
    perms = {tag: perm for tag, perm, _id in entries if tag in (USER_OBJ, OTHER)}
    g = _group_class(entries)
    group = entries[g][1] if g >= 0 else 0
    new = (mode & ~0o777) | (perms.get(USER_OBJ, 0) << 6) | (group << 3) | \
        perms.get(OTHER, 0)
    equivalent = all(tag in (USER_OBJ, GROUP_OBJ, OTHER) for tag, _p, _id in entries)
    return new, equivalent


def chmod(value: bytes, mode: int) -> bytes:
    """The access ACL after chmod(mode): owner, group class and other follow the mode."""
    entries = decode(value)
    if entries is None:
        return value
    g = _group_class(entries)
    out = []
    for i, (tag, perm, id_) in enumerate(entries):
        if tag == USER_OBJ:
            perm = (mode >> 6) & 7
        elif i == g:
            perm = (mode >> 3) & 7
        elif tag == OTHER:
            perm = mode & 7
        out.append((tag, perm, id_))
    return encode(out)


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """A new inode under a directory with this default ACL: (its mode, its access ACL or
    None when the mode says it all).  The umask is not applied (POSIX)."""
    entries = decode(default)
    if entries is None:
        return mode, None
    g = _group_class(entries)
    out = []
    for i, (tag, perm, id_) in enumerate(entries):
        if tag == USER_OBJ:
            perm &= (mode >> 6) & 7
        elif i == g:
            perm &= (mode >> 3) & 7
        elif tag == OTHER:
            perm &= mode & 7
        out.append((tag, perm, id_))
    new_mode, equivalent = mode_of(out, mode)
    return new_mode, None if equivalent else encode(out)
