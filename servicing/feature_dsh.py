"""deb-systemd-helper's state, kept in Python exactly as the image's own
/usr/bin/deb-systemd-helper (init-system-helpers 1.65, Perl) keeps it: its `update-state`,
`was-enabled` and the end of its `unmask`.

Why not run it: it is a Perl program started once per unit and question, ~0.3 s each in
the image's container on a session mount (most of a feature change's time); what it does
for these three is small and is reproduced here line for line, quirks included (its
[Install] parsing is its own, not systemd's: regular expressions on every line of the unit
file, whatever the section, case-sensitive where the Perl compares with `eq`, and Perl's
$1 after a quote-stripping substitution).  tests/test_servicing_features_dsh.py runs the
real one in the image's container on the same units and compares the state files byte
for byte.

    update-state UNIT  writes /var/lib/systemd/deb-systemd-helper-enabled/UNIT.dsh-also: the
                       links `enable` would make (get_link_closure), one per line
    was-enabled UNIT   true when every link listed there is a symlink (or there is no list)
    unmask UNIT        removes /var/lib/systemd/deb-systemd-helper-masked/UNIT, then that
                       directory's empty subdirectories and itself if empty

Paths are resolved inside the root (servicing.roots.MountRoot), as they are in the
container: a symlink in the image never leads a read or a write out of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat

from .feature_tree import DirSource, peek
from .roots import MountRoot, make_dirs, write_file

ENABLED = "/var/lib/systemd/deb-systemd-helper-enabled"
MASKED = "/var/lib/systemd/deb-systemd-helper-masked"
SYSTEM = b"/etc/systemd/system/"
FIND = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
MAX_UNIT_FILE = 1 << 20
WANTS = re.compile(rb"^\s*(WantedBy|RequiredBy)=(.+)$", re.I)
ALSO = re.compile(rb"^\s*Also=(.+)$", re.I)
ALIAS = re.compile(rb"^\s*Alias=(.+)$", re.I)
DEFAULT_INSTANCE = re.compile(rb"""^\s*DefaultInstance=\s*(["']?+)(.+)\1\s*$""", re.I)
QUOTED = re.compile(rb"""^(["'])(.*)\1$""")
TEMPLATE = re.compile(rb"^(.*@)(\.\w+)$")


class Unreadable(Exception):
    """deb-systemd-helper would stop here (`unable to read`): a unit file it needs (the
    unit's, or one its Also= names) is not where it looks."""


def find_unit(root: MountRoot, name: str) -> str:
    """find_unit: the first regular file of that name (symlinks followed) in /etc, /lib,
    /usr/lib's systemd/system; else the bare name (which it then fails to read)."""
    for top in FIND:
        real = root.resolve(f"{top}/{name}")
        if real is not None and stat.S_ISREG(os.stat(real).st_mode):
            return f"{top}/{name}"
    return name


def link_closure(root: MountRoot, path: str, visited: list[str] | None = None
                 ) -> list[bytes]:
    """get_link_closure: the links (their paths) enabling the unit file at path makes,
    in deb-systemd-helper's order.  Unreadable when it cannot read a file it needs."""
    # A bare name (find_unit found nothing) is opened relative to the working directory,
    # which is / for a maintainer script.
    data = root.read(path if path.startswith("/") else f"/{path}", MAX_UNIT_FILE)
    if data is None:
        raise Unreadable(path)
    visited = list(visited or [])
    name = os.path.basename(path).encode()
    target = name
    links: list[bytes] = []
    wants_dirs: list[bytes] = []
    for line in data.split(b"\n"):
        if (m := WANTS.match(line)) is not None:
            dollar1 = m.group(1)
            for value in _split(m.group(2)):
                value, dollar1 = _unquoted(value, dollar1)
                suffix = {b"WantedBy": b".wants", b"RequiredBy": b".requires"}.get(dollar1, b"")
                wants_dirs.append(SYSTEM + value + suffix + b"/")
        if (m := ALSO.match(line)) is not None:
            for value in _split(m.group(1)):
                value, _ = _unquoted(value, b"")
                also = os.fsdecode(value)
                if value != name and also not in visited:
                    visited.append(also)
                    links += link_closure(root, find_unit(root, also), visited)
        if (m := ALIAS.match(line)) is not None:
            dollar1 = m.group(1)
            for value in _split(m.group(1)):
                value, dollar1 = _unquoted(value, dollar1)
                if value != name:
                    links.append(SYSTEM + dollar1)
        if (m := DEFAULT_INSTANCE.match(line)) is not None:
            t = TEMPLATE.match(name)
            target = t.group(1) + m.group(2) + t.group(2) if t is not None else name
    return links + [d + target for d in wants_dirs]


def _split(text: bytes) -> list[bytes]:
    """Perl's split(/\\s+/, text): a leading empty field is kept, trailing ones dropped."""
    fields = re.split(rb"\s+", text)
    while fields and not fields[-1]:
        fields.pop()
    return fields


def _unquoted(value: bytes, dollar1: bytes) -> tuple[bytes, bytes]:
    """s/^(["'])(.*)\\g1$/$2/ on value, and Perl's $1 afterwards (the quote when it
    matched, else unchanged)."""
    m = QUOTED.match(value)
    return (m.group(2), m.group(1)) if m is not None else (value, dollar1)


def state_path(unit: str) -> str:
    return f"{ENABLED}/{os.path.basename(unit)}.dsh-also"


def update_state(root: MountRoot, unit: str) -> list[bytes]:
    """update-state UNIT: its .dsh-also rewritten with the links enabling it makes (none
    created); the links.  Unreadable as deb-systemd-helper would fail."""
    links = link_closure(root, find_unit(root, unit))
    directory = make_dirs(root, ENABLED, 0o755)
    write_file(directory, os.path.basename(state_path(unit)), b"".join(x + b"\n" for x in links))
    return links


def was_enabled(root: MountRoot, unit: str) -> bool:
    """was-enabled UNIT: every link its .dsh-also lists is a symlink (true without a
    list)."""
    data = root.read(state_path(unit), MAX_UNIT_FILE) or b""
    src = DirSource(root.path)
    lines = data.split(b"\n")
    if not lines[-1]:  # what follows the last newline, as Perl's <$fh> reads lines
        lines.pop()
    for line in lines:
        node = peek(src, "/" + os.fsdecode(line))  # relative: from the working directory, /
        if node is None or node.kind != "lnk":
            return False
    return True


def forget_mask(root: MountRoot, unit: str) -> bool:
    """The end of unmask UNIT: its mask state file goes, then the state directory's empty
    subdirectories and the directory itself if empty (a symlinked subdirectory, which
    the Perl would follow, is left alone).  True if there was one."""
    directory = root.resolve(MASKED)
    if directory is None or not os.path.isdir(directory) or os.path.islink(directory):
        return False
    state = os.path.join(directory, os.path.basename(unit))
    had = os.path.lexists(state)
    if had:
        os.unlink(state)
    _rmdir_if_empty(directory)
    return had


def _rmdir_if_empty(directory: str) -> None:
    for name in os.listdir(directory):
        sub = os.path.join(directory, name)
        if not name.startswith(".") and os.path.isdir(sub) and not os.path.islink(sub):
            _rmdir_if_empty(sub)
    with contextlib.suppress(OSError):
        os.rmdir(directory)


