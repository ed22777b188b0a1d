"""The host's `systemctl --root=DIR`: the engine and the oracle of unit-file states.

`systemctl --root` works offline on a directory: it reads and writes unit files and their
symlinks without a running systemd, and it resolves every symlink inside DIR.  It runs
with a clean environment (no $SYSTEMD_UNIT_PATH of the caller's) and SYSTEMCTL_SKIP_SYSV=1:
without it, enable and disable of a unit that has an /etc/init.d script would run the
host's systemd-sysv-install, which chroots into DIR and runs the image's update-rc.d with
the host's full privileges; servicing.feature_debian does that step in the image's
container instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from imagefs.errors import SystemFailure, one_line

from .feature_tree import HOST_PATH

TIMEOUT = 300.0  # seconds for one systemctl run
# What `is-enabled` says when it cannot tell a unit's state (it stops there).
FAILED = re.compile(r"Failed to get unit file state for (.+?): (.+)")


@dataclass(frozen=True)
class UnitFile:
    """One line of `systemctl list-unit-files`."""

    unit: str
    state: str
    preset: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"unit": self.unit, "state": self.state, "preset": self.preset}


def systemctl(root: str, args: Sequence[str], timeout: float = TIMEOUT
              ) -> subprocess.CompletedProcess[str]:
    """The host's `systemctl --root=root ARGS` (stdout and stderr as text)."""
    exe = shutil.which("systemctl", path=HOST_PATH)
    if exe is None:
        raise SystemFailure("systemctl", "not found; install the Debian package systemd")
    env = {"PATH": HOST_PATH, "LC_ALL": "C.UTF-8", "SYSTEMCTL_SKIP_SYSV": "1",
           "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    try:
        return subprocess.run([exe, f"--root={root}", "--no-pager", *args], env=env,
                              capture_output=True, text=True, errors="replace", cwd="/",
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemFailure("systemctl", f"{args[0]} ran longer than {timeout:g} s") from None
    except OSError as e:
        raise SystemFailure(exe, f"cannot run: {e.strerror}") from None


def list_unit_files(root: str) -> list[UnitFile]:
    """Every unit file under root and its state, as `systemctl --root=root
    list-unit-files --output=json` reports them, in its order."""
    out = systemctl(root, ["list-unit-files", "--output=json"])
    try:
        rows = json.loads(out.stdout) if out.stdout.strip() else None
    except ValueError:
        rows = None
    # It exits 1 when it lists nothing ("[]"): that is an answer too.
    if not isinstance(rows, list) or (out.returncode != 0 and rows):
        raise SystemFailure("systemctl list-unit-files", _why(out))
    found = []
    for row in rows:
        if isinstance(row, dict) and isinstance(row.get("unit_file"), str):
            preset = row.get("preset")
            found.append(UnitFile(row["unit_file"], str(row.get("state")),
                                  preset if isinstance(preset, str) else None))
    return found


def unit_states(root: str, units: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({unit: state}, {unit: why its state is unknown}) by `systemctl is-enabled`.

    is-enabled prints one state per unit in order and stops at the first unit it cannot
    tell (a unit with no file, a symlink loop): that one is set aside with systemctl's
    reason and the rest asked again."""
    states: dict[str, str] = {}
    unknown: dict[str, str] = {}
    todo = list(units)
    while todo:
        out = systemctl(root, ["is-enabled", "--", *todo])
        said = out.stdout.split()
        for unit, state in zip(todo, said, strict=False):
            states[unit] = state
        if len(said) >= len(todo):
            break
        failed = FAILED.search(out.stderr)
        if failed is None:
            raise SystemFailure("systemctl is-enabled", _why(out))
        unknown[todo[len(said)]] = failed.group(2).strip()
        todo = todo[len(said) + 1:]
    return states, unknown


def _why(out: subprocess.CompletedProcess[str]) -> str:
    lines = (out.stderr or out.stdout).strip().splitlines()
    return one_line(lines[-1]) if lines else f"exit code {out.returncode}"
