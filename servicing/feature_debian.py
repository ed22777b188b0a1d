"""Debian's bookkeeping around a unit's enablement, kept as Debian's own tools keep it, so
that a later reinstall or upgrade of the package does not undo the admin's choice.

- SysV: a unit that also has an /etc/init.d script gets its rc links synchronised, as
  `systemctl enable|disable` does through systemd-sysv-install: `update-rc.d NAME
  defaults` then `update-rc.d NAME enable|disable` (with _SKIP_SYSTEMD_NATIVE=1, as
  systemd-sysv-install sets it), run by the image's own update-rc.d in its container
  (servicing.runner), not by the host's chroot.
- deb-systemd-helper (init-system-helpers) remembers, in
  /var/lib/systemd/deb-systemd-helper-enabled/UNIT.dsh-also, the links enabling a unit
  makes.  A package's postinst asks `deb-systemd-helper was-enabled UNIT`, true when all
  those links exist *or when there is no such file*, and then enables the unit again (by
  `systemctl preset` when it has no such file).  So after enable and disable the unit's
  state is updated as `deb-systemd-helper update-state UNIT` does it (its links recorded,
  none created: servicing.feature_dsh), and was-enabled must then answer as the unit now
  is: after a disable, false, and the postinst leaves the unit disabled.
- Masks: the postinst's `deb-systemd-helper unmask UNIT` lifts a mask that
  deb-systemd-helper made itself, which it knows by the state file
  /var/lib/systemd/deb-systemd-helper-masked/UNIT.  Masking a unit makes the mask the
  admin's, and unmasking it ends it: either way that state file goes, as
  deb-systemd-helper's unmask removes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .feature_dsh import ENABLED, MASKED, Unreadable, forget_mask, update_state, was_enabled
from .feature_tree import DirSource, Node, peek, resolve, source_of, unit_dirs
from .roots import MountRoot, Root
from .runner import run
from .transaction import ServicingFailed

if TYPE_CHECKING:
    from .features import UnitAction

DSH = "/usr/bin/deb-systemd-helper"
TIMEOUT = 600.0
MARK = "\x1e"
SCRIPT = r"""
fail() { printf '\036FAIL %s\n' "$*"; exit 1; }
while [ $# -ge 2 ]; do
  verb=$1 name=$2; shift 2
  update-rc.d "$name" defaults || fail "update-rc.d $name defaults"
  update-rc.d "$name" "$verb" || fail "update-rc.d $name $verb"
  if ls /etc/rc[S5].d/S??"$name" >/dev/null 2>&1; then s=yes; else s=no; fi
  printf '\036SYSV %s %s\n' "$name" "$s"
done
"""
# Where a unit's enablement and Debian's bookkeeping of it live: (directory, depth).
WATCHED = (("/etc/systemd/system", 2), *((f"/etc/rc{r}.d", 1) for r in "0123456S"),
           (ENABLED, 2), (MASKED, 1))
MAX_WATCHED = 5000  # entries a snapshot records at most


class Facts:
    """What a feature plan needs to know of a root beyond the units' states."""

    def __init__(self, root: Root) -> None:
        self.root, self.src = root, source_of(root)
        self.dsh = "deb-systemd-helper" in (root.names(os.path.dirname(DSH)) or [])
        self.rcd = "update-rc.d" in (root.names("/usr/sbin") or [])
        self.initd = set(root.names("/etc/init.d") or [])
        self.masked_by_dsh = set(root.names(MASKED) or [])

    def sysv_script(self, name: str) -> bool:
        return self.rcd and name in self.initd

    def dsh_masked(self, unit: str) -> bool:
        return unit in self.masked_by_dsh

    def masked_at(self, unit: str) -> str | None:
        """'etc' or 'run' when a mask of the admin's (in /etc or /run) is there."""
        for where in ("etc", "run"):
            if peek(self.src, f"/{where}/systemd/system/{unit}") is not None:
                return where
        return None

    def admin_file(self, unit: str) -> bool:
        """Something already has the place a mask would take."""
        return peek(self.src, f"/etc/systemd/system/{unit}") is not None

    def alias_of(self, unit: str) -> str | None:
        """The unit an alias name points to (the first link of that name on the unit
        search path)."""
        for top in unit_dirs():
            node = peek(self.src, f"{top}/{unit}")
            if node is not None and node.kind == "lnk":
                return os.path.basename(os.fsdecode(node.target)) or None
        return None


def sync_debian(root: str, actions: Sequence[UnitAction]) -> dict[str, dict[str, Any]]:
    """Keep the bookkeeping of actions in the writable root at root; per unit, what was done
    and what Debian's tools now say.  ServicingFailed when update-rc.d fails, or when
    deb-systemd-helper would enable a disabled unit again."""
    done: dict[str, dict[str, Any]] = {a.unit: {} for a in actions if a.sysv or a.dsh}
    mroot = MountRoot(root)
    for a in actions:
        if a.dsh == "update-state":
            try:
                links = update_state(mroot, a.unit)
            except Unreadable as e:
                done[a.unit]["deb_systemd_helper"] = (f"not kept: it cannot read {e.args[0]} "
                                                      "(as deb-systemd-helper could not)")
                continue
            done[a.unit].update(deb_systemd_helper="update-state",
                                dsh_links=[os.fsdecode(x) for x in links],
                                was_enabled=was_enabled(mroot, a.unit))
        elif a.dsh == "forget-mask" and forget_mask(mroot, a.unit):
            done[a.unit]["deb_systemd_helper"] = "mask state removed"
    text = _sysv(root, [a for a in actions if a.sysv], done)
    _check(actions, done, text)
    return {unit: entry for unit, entry in done.items() if entry}


def _sysv(root: str, actions: Sequence[UnitAction], done: dict[str, dict[str, Any]]) -> str:
    """update-rc.d for each action's init script, in one container run; its output."""
    if not actions:
        return ""
    args = [x for a in actions for x in (a.verb, a.unit.removesuffix(".service"))]
    out = run(root, ["sh", "-c", SCRIPT, "sh", *args], timeout=TIMEOUT,
              env={"_SKIP_SYSTEMD_NATIVE": "1"})
    text = (out.stdout + out.stderr).decode(errors="replace")
    said = [ln[1:].split(" ", 2) for ln in out.stdout.decode(errors="replace").split("\n")
            if ln.startswith(MARK)]
    failed = [" ".join(w[1:]) for w in said if w[0] == "FAIL"]
    if out.returncode != 0 or failed:
        raise ServicingFailed(f"{failed[0] if failed else 'update-rc.d'} failed in the "
                              "image's container", text)
    for _kind, name, value in (w for w in said if len(w) == 3 and w[0] == "SYSV"):
        done[f"{name}.service"]["sysv_rc_links"] = "enabled" if value == "yes" else "disabled"
    return text


def _check(actions: Sequence[UnitAction], done: dict[str, dict[str, Any]],
           text: str) -> None:
    wrong = []
    for a in actions:
        entry = done.get(a.unit, {})
        if a.verb == "disable" and entry.get("was_enabled"):
            wrong.append(f"deb-systemd-helper would enable {a.unit} again on a reinstall")
        if a.sysv and entry.get("sysv_rc_links") != f"{a.verb}d":
            wrong.append(f"the SysV rc links of {a.unit} are not {a.verb}d")
    if wrong:
        raise ServicingFailed("; ".join(wrong), text)


def snapshot(root: str) -> dict[str, str]:
    """{path: what is there} for every entry of WATCHED in the directory root: a symlink's
    target, a file's size and sha256."""
    src = DirSource(root)
    found: dict[str, str] = {}
    for top, depth in WATCHED:
        real = resolve(src, os.fsencode(top))
        if real is not None and (src.node(real) or Node("")).kind == "dir":
            _walk(src, real, os.fsencode(top), depth, found)
    return found


def _walk(src: DirSource, real: bytes, shown: bytes, depth: int,
          found: dict[str, str]) -> None:
    for name in src.names(real):
        if len(found) >= MAX_WATCHED:
            return
        node = src.node(real + b"/" + name)
        where = os.fsdecode(shown + b"/" + name)
        if node is None:
            continue
        if node.kind == "lnk":
            found[where] = "-> " + os.fsdecode(node.target)
        elif node.kind == "reg":
            data = src.data(real + b"/" + name, min(node.size, 1 << 20))
            found[where] = f"file, {node.size} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
        elif node.kind == "dir" and depth > 1:
            _walk(src, real + b"/" + name, shown + b"/" + name, depth - 1, found)


def snapshot_diff(before: dict[str, str], after: dict[str, str]) -> dict[str, list[Any]]:
    """What changed between two snapshots: created, removed and changed entries."""
    return {"created": [{"path": p, "now": after[p]} for p in sorted(after.keys() - before)],
            "removed": [{"path": p, "was": before[p]} for p in sorted(before.keys() - after)],
            "changed": [{"path": p, "was": before[p], "now": after[p]}
                        for p in sorted(before.keys() & after.keys())
                        if before[p] != after[p]]}
