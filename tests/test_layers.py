"""The dependency direction: daemon → servicing → imagefs.  The imagefs library never
imports the daemon (only its CLI, the outermost layer, does: `imagefs daemon` and the
verbs' --daemon); the daemon never imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a module (relative ones stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_imagefs_library_does_not_import_upward() -> None:
    for path in (REPO / "imagefs").rglob("*.py"):
        if "cli" in path.relative_to(REPO / "imagefs").parts:
            continue
        upward = {n for n in imported(path) if n.split(".")[0] in ("daemon", "servicing")}
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"


def test_daemon_does_not_import_the_cli() -> None:
    for path in (REPO / "daemon").rglob("*.py"):
        cli = {n for n in imported(path) if n.startswith("imagefs.cli")}
        assert not cli, f"{path.relative_to(REPO)} imports {sorted(cli)}"
