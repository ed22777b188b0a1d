"""The fork server of a verb run without a daemon (daemon/forked_server.py), forked ahead
as soon as the CLI's words name a transaction of its own (imagefs.cli.forks_ahead)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from conftest import wait_until

from daemon import forked_server
from imagefs.cli import forks_ahead
from imagefs.mount.kernel import pid_alive

DEB = "hello.deb"


@pytest.mark.parametrize(("words", "ahead"), [
    (["package", "add", "I", "1", DEB, "--no-daemon"], True),
    (["package", "remove", "I", "all", "hello", "--no-daemon"], True),
    (["driver", "add", "I", "1", "--repository", "R", "--no-daemon"], True),
    (["feature", "enable", "I", "1", "chrony.service", "--no-daemon"], True),
    (["generalize", "I", "1", "--no-daemon"], True),
    (["firstboot", "add", "I", "1", "--command", "true", "--no-daemon"], True),
    (["package", "list", "I", "1", "--no-daemon"], False),  # reads the image, no mount
    (["driver", "inventory", "--no-daemon"], False),
    (["health", "check", "I", "1", "--no-daemon"], False),
    (["package", "add", "I", "1", DEB, "--dry-run", "--no-daemon"], False),  # no mount
    (["package", "add", "--mount", "M", DEB, "--no-daemon"], False),  # the caller's session
    (["package", "add", "I", "1", DEB, "--daemon"], False),  # the daemon's mounts
    (["package", "add", "--help"], False),
    (["info", "I", "--no-daemon"], False),
    ([], False),
])
def test_forks_ahead_for_a_transaction_of_its_own_only(words: list[str], ahead: bool) -> None:
    assert forks_ahead(words) is ahead


def test_without_a_word_on_the_daemon_it_forks_ahead_unless_one_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "d.sock")
    monkeypatch.setenv("IMAGEFS_SOCKET", path)
    words = ["package", "add", "I", "1", DEB]
    assert forks_ahead(words)  # no daemon: this process mounts
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(path)
        listening.listen()
        assert not forks_ahead(words)  # the daemon will
    finally:
        listening.close()


def test_a_server_forked_ahead_is_the_one_taken_unless_it_died() -> None:
    forked_server.fork_ahead()
    ahead = forked_server._ahead
    assert ahead is not None
    taken = forked_server.fork_server()
    try:
        assert taken == ahead and forked_server._ahead is None
    finally:
        _end(*taken)
    forked_server.fork_ahead()
    dead = forked_server._ahead
    assert dead is not None
    os.kill(dead[0].pid, signal.SIGKILL)
    assert wait_until(lambda: dead[0].poll() is not None, 10)
    fresh = forked_server.fork_server()
    try:
        assert fresh[0].pid != dead[0].pid and fresh[0].poll() is None
        assert dead[1].fileno() == -1  # the dead one's socket is closed
    finally:
        _end(*fresh)


def _end(server: forked_server.ForkedServer, ours: socket.socket) -> None:
    """Close our end: the server (ours, by pid) sees it and exits."""
    ours.close()
    server.wait(10)
    assert not pid_alive(server.pid)
