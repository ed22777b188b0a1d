"""The exactness tests and the writable-model test once more, with the shim's fast paths
off (IMAGEFS_NO_FAST_PATHS=1): pyfuse3's own handlers must serve the same trees and
outcomes as the fast paths the rest of the run uses (docs/shim.md).

The selected tests run unchanged in a pytest subprocess whose environment has the
variable set; their mounts (`imagefs mount`, no daemon) inherit it.  Every mount log of
that run must say the fast paths were off: the run proves it took the slow path.  (The
subprocess's conftest removes its run dir, logs included, at its end: a small plugin
copies the logs after each test.)  The subprocess keeps its temp dirs (basetemp, TMPDIR)
under this test's tmp_path; its own fixtures unmount everything it mounts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_rw_model import EXAMPLES_ENV

from imagefs.mount.shim import ENV_OFF, OFF

# The tests that compare a mount with its source exactly, and the writable-model test
# (with its own bounded example count).
EXACTNESS_AND_MODEL = (
    "tests/test_mount.py::test_every_type_tree_is_served_exactly",
    "tests/test_mount.py::test_fixture_slice_is_served_exactly",
    "tests/test_rw_model.py::test_rw_mount_matches_plain_directory",
)


# Loaded into the subprocess (-p): after each test, its mount logs (IMAGEFS_RUN_DIR, set
# by conftest for the session and removed at its end) are copied to $KEEP_MOUNT_LOGS.
KEEP_LOGS_PLUGIN = """\
import os
import shutil
from pathlib import Path


def pytest_runtest_logreport(report):
    run, keep = os.environ.get("IMAGEFS_RUN_DIR"), os.environ.get("KEEP_MOUNT_LOGS")
    if report.when != "call" or not run or not keep:
        return
    for log in Path(run, "mounts").glob("*.log"):
        shutil.copyfile(log, Path(keep, log.name))
"""


def run_tests_in_subprocess(tests: tuple[str, ...], tmp_path: Path, env: dict[str, str],
                            cwd: Path = REPO, timeout: float = 900,
                            drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """pytest TESTS in a child process with env added to this one's (less the names in
    drop); temp dirs (TMPDIR, --basetemp) under tmp_path.  Passes when every selected test
    passed."""
    tmp = tmp_path / "tmp"
    plugins = tmp_path / "plugins"
    for d in (tmp, plugins, tmp_path / "logs"):
        d.mkdir(exist_ok=True)
    (plugins / "imagefs_keep_mount_logs.py").write_text(KEEP_LOGS_PLUGIN)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-p", "imagefs_keep_mount_logs", "--basetemp", str(tmp_path / "basetemp"),
            *(str(REPO / t) for t in tests)]
    full = {k: v for k, v in os.environ.items() if k not in drop}
    path = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(plugins)) if p)
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**full, "TMPDIR": str(tmp), **env, "PYTHONPATH": path,
                               "KEEP_MOUNT_LOGS": str(tmp_path / "logs")})
    summary = proc.stdout[-6000:] + "\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, f"pytest {' '.join(tests)} failed:\n{summary}"
    assert re.search(rf"\b{len(tests)} passed\b", proc.stdout), summary
    return proc


def mount_logs(tmp_path: Path) -> dict[Path, str]:
    """The mount logs of a run_tests_in_subprocess run (as copied after each test)."""
    return {p: p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.log"))}


def check_without_fast_paths(tmp_path: Path, model_examples: int) -> None:
    run_tests_in_subprocess(EXACTNESS_AND_MODEL, tmp_path,
                            {ENV_OFF: "1", EXAMPLES_ENV: str(model_examples)})
    logs = mount_logs(tmp_path)
    # two exactness mounts, and the model's writable mounts and read-only checks
    assert len(logs) >= 3, f"expected the mount logs of the run, found {sorted(logs)}"
    said = f"{OFF}: {ENV_OFF}=1 is set"
    for path, text in logs.items():
        assert said in text, f"{path} does not say the fast paths were off:\n{text[-2000:]}"
        # once per mount process: as many lines as the log has mounts
        assert text.count(said) == text.count(" mounted "), text[-2000:]


def test_exactness_and_rw_model_without_fast_paths(tmp_path: Path) -> None:
    """The model with half its examples (10 of the 20 the fast paths get by default)."""
    check_without_fast_paths(tmp_path, 10)


@pytest.mark.slow
def test_exactness_and_rw_model_without_fast_paths_full(tmp_path: Path) -> None:
    """The model with as many examples as with the fast paths (20)."""
    check_without_fast_paths(tmp_path, 20)
