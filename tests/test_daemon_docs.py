"""docs/api.md stays true to the daemon, and the daemon starts under socket activation.

The page's method reference and error table are generated (daemon/apidoc.py) and pasted
between marker comments; these tests compare them with what the code renders now, so a
method, parameter or error code changed without the docs fails here.  Every method must
also have its own "result" section with an example.

Socket activation is tried for real with systemd-socket-activate, which listens as
systemd would and execs the daemon with the listening socket as fd 3 (LISTEN_FDS=1) on
the first connection: the contrib/imagefs.socket path taken without systemd.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.apidoc import error_table, method_reference
from daemon.client import Client
from daemon.rpc import METHODS

REPO = Path(__file__).resolve().parent.parent
API_MD = REPO / "docs" / "api.md"
ACTIVATE = "/usr/bin/systemd-socket-activate"


def marked(name: str) -> str:
    """The text between <!-- name:begin --> and <!-- name:end --> in docs/api.md."""
    text = API_MD.read_text()
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"docs/api.md has no <!-- {name}:begin/end --> section"
    return m.group(1)


def test_method_reference_is_current() -> None:
    assert marked("methods") == method_reference(), (
        "docs/api.md's method reference is out of date; paste the output of "
        "daemon.apidoc.method_reference() between its methods markers")


def test_error_table_is_current() -> None:
    assert marked("errors") == error_table(), (
        "docs/api.md's error table is out of date; paste the output of "
        "daemon.apidoc.error_table() between its errors markers")


def test_every_method_has_a_result_section() -> None:
    """The generated part lists parameters only; the result and an example are prose, so
    a new method must get its own section (and a removed one lose it)."""
    text = API_MD.read_text()
    generated = marked("methods")
    prose = text.replace(generated, "")
    sections = set(re.findall(r"^### (\S+) result$", prose, re.M))
    assert sorted(set(METHODS) - sections) == [], "methods without a result section"
    assert sorted(sections - set(METHODS)) == [], "result sections of no method"
    for name in METHODS:
        assert f'"method":"{name}"' in prose, f"no example calls {name}"


# --- socket activation --------------------------------------------------------------------

def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains text (our tmp_path: nothing else names it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        zombie = stat.rsplit(b")", 1)[1].split()[0] == b"Z"
        if text.encode() in cmdline and not zombie:
            found.append(int(entry))
    return found


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not go within 20 s; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """systemd-socket-activate listening at tmp_path/d.sock, to exec the daemon on the
    first connection; (process, socket path, state dir).  Always stopped at the end."""
    if not os.access(ACTIVATE, os.X_OK):
        pytest.skip(f"{ACTIVATE} is not installed (Debian package systemd)")
    sock, state, run = tmp_path / "d.sock", tmp_path / "state", tmp_path / "run"
    # systemd-socket-activate passes the child only PATH, TERM, USER, HOME and -E values.
    env = {"IMAGEFS_STATE_DIR": str(state), "IMAGEFS_RUN_DIR": str(run),
           "PYTHONPATH": str(REPO)}
    # --socket: were the inherited socket ignored, the daemon would bind this (and the
    # test fail) rather than the default /run/imagefs/imagefs.sock of a real daemon.
    argv = [ACTIVATE, "-l", str(sock), *(f"-E{k}={v}" for k, v in env.items()),
            sys.executable, "-m", "imagefs.cli", "daemon", "--state-dir", str(state),
            "--socket", str(tmp_path / "own.sock")]
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env={**os.environ, **env}, cwd=REPO)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists(), (tmp_path / "daemon.log").read_text()
        yield proc, sock, state
    finally:
        stop(proc)
        assert processes_mentioning(str(tmp_path)) == [], "a process was left behind"


def test_daemon_takes_over_an_inherited_socket(
        activated: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path) -> None:
    proc, sock, state = activated
    inode = sock.stat().st_ino
    with Client(str(sock), timeout=30) as c:  # this connection makes it exec the daemon
        status = c.call("daemon.status")
    log = (tmp_path / "daemon.log").read_text()
    # systemd-socket-activate execs the daemon in its own process: the same pid serves.
    assert status["pid"] == proc.pid, log
    assert status["peer"]["uid"] == os.getuid()
    assert status["state_dir"] == str(state)
    assert status["methods"] == sorted(METHODS)
    # The daemon listens on the socket it was given (it did not bind one of its own), and
    # keeps listening after the first client leaves.
    assert sock.stat().st_ino == inode
    assert not (tmp_path / "own.sock").exists()
    with Client(str(sock), timeout=30) as c:
        assert c.call("jobs.list") == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log
    # The socket belongs to whoever passed it (systemd removes it: RemoveOnStop=yes).
    assert sock.exists()
