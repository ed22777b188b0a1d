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


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    records = root / "imagefs" / "format" / "records.py"
    records.write_text(records.read_text() + "\nfrom imagefs.session import mounts  # up\n")
    r = lint(root)
    assert r.returncode != 0
    assert "imagefs.format.records -> imagefs.session.mounts" in r.stdout, r.stdout


def test_the_library_may_not_import_the_daemon(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    kernel = root / "imagefs" / "mount" / "kernel.py"
    kernel.write_text(kernel.read_text() + "\nimport daemon.protocol  # up\n")
    r = lint(root)
    assert r.returncode != 0
    assert "imagefs.mount.kernel -> daemon.protocol" in r.stdout, r.stdout


def test_a_cycle_between_siblings_is_caught(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    options = root / "imagefs" / "mount" / "options.py"
    options.write_text(options.read_text() + "\nfrom . import process  # a cycle\n")
    r = lint(root)
    assert r.returncode != 0
    assert "No cycles are allowed in imagefs.mount" in r.stdout, r.stdout
