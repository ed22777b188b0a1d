"""The layers point down (pyproject.toml [tool.importlinter], DESIGN.md): imagefs.cli →
daemon → servicing → the imagefs library, and inside it session → mount → format, with no
cycles between siblings.  import-linter checks them; these tests prove that it does, and
that an upward import is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--no-logo"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(dest: Path) -> Path:
    for name in ("imagefs", "daemon", "servicing"):
        shutil.copytree(REPO / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_hold() -> None:
    r = lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(("module", "added", "caught"), [
    # an upward import inside the library: format may not know sessions
    ("imagefs/format/records.py", "from imagefs.session import mounts  # up",
     "imagefs.format.records -> imagefs.session.mounts"),
    # the library may not import the daemon
    ("imagefs/mount/kernel.py", "import daemon.protocol  # up",
     "imagefs.mount.kernel -> daemon.protocol"),
    # siblings may not import each other both ways
    ("imagefs/mount/options.py", "from . import process  # a cycle",
     "No cycles are allowed in imagefs.mount"),
])
def test_a_forbidden_import_is_caught(tmp_path: Path, module: str, added: str,
                                      caught: str) -> None:
    root = copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{added}\n")
    r = lint(root)
    assert r.returncode != 0
    assert caught in r.stdout, r.stdout
