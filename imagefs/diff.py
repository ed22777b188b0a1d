"""Diff two indices: paths added, removed, and changed (content, or which metadata).

Walks both trees together and skips any subtree whose Merkle digest is the same on both
sides, so the cost follows the size of the difference, not of the images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagefs.format import layout as F
from imagefs.format.records import Inode
from imagefs.format.view import MAX_DEPTH, IndexView

from .errors import CorruptImage


@dataclass
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, list[str]]] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "added": self.added, "removed": self.removed,
            "changed": [{"path": p, "what": w} for p, w in self.changed],
            "summary": {"added": len(self.added), "removed": len(self.removed),
                        "changed": len(self.changed)},
        }


def what_changed(a: Inode, b: Inode) -> list[str]:
    if a.kind != b.kind:
        return ["type"]
    out = []
    if a.kind == F.REG and [e[:4] for e in a.extents] != [e[:4] for e in b.extents]:
        out.append("content")
    if a.kind == F.LNK and a.target != b.target:
        out.append("target")
    if a.mode != b.mode:
        out.append("mode")
    if (a.uid, a.gid) != (b.uid, b.gid):
        out.append("owner")
    if a.size != b.size and a.kind == F.REG:
        out.append("size")
    if a.rdev != b.rdev:
        out.append("rdev")
    if a.mtime_ns != b.mtime_ns:
        out.append("mtime")
    if sorted(a.xattrs) != sorted(b.xattrs):
        out.append("xattrs")
    if a.nlink != b.nlink:
        out.append("nlink")
    return out


def diff(va: IndexView, vb: IndexView) -> Diff:
    result = Diff()
    stack: list[tuple[bytes, Inode, Inode, int]] = [(b"", va.root(), vb.root(), 0)]
    while stack:
        path, a, b, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CorruptImage(va.image.path, "directory tree too deep (a cycle?)")
        if a.digest == b.digest:
            continue
        shown = path.decode("utf-8", "backslashreplace") or "/"
        if a.kind != F.DIR or b.kind != F.DIR:
            result.changed.append((shown, what_changed(a, b)))
            continue
        meta = [w for w in what_changed(a, b) if w != "nlink"]
        if meta:
            result.changed.append((shown, meta))
        ea = {name: ref for name, _k, ref in a.entries}
        eb = {name: ref for name, _k, ref in b.entries}
        for name in sorted(ea.keys() | eb.keys(), reverse=True):
            p = path + b"/" + name
            if name not in eb:
                _all_under(va, p, ea[name], result.removed)
            elif name not in ea:
                _all_under(vb, p, eb[name], result.added)
            elif ea[name] != eb[name]:
                stack.append((p, va.get(ea[name]), vb.get(eb[name]), depth + 1))
    result.added.sort()
    result.removed.sort()
    result.changed.sort()
    return result


def _all_under(view: IndexView, path: bytes, ref: int, out: list[str]) -> None:
    for p, _ino in view.walk(view.get(ref), path):
        out.append(p.decode("utf-8", "backslashreplace"))
