"""tests/cli_zygote.py: a command forked from the zygote ends exactly as the same command
run as a fresh `python -m imagefs.cli` process: the same exit code (or signal), the same
stdout and stderr byte for byte, the same files, with the caller's cwd, umask,
environment and arguments (non-UTF-8 bytes included)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cli_zygote
import pytest
from conftest import guardians_of, is_mounted, mounted, run_imagefs


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("zygote-src")
    (src / "a.txt").write_bytes(b"hello\n")
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name\n")
    (src / "d").mkdir()
    (src / "d/big.bin").write_bytes(os.urandom(3 << 20))
    img = tmp_path_factory.mktemp("zygote") / "z.imagefs"
    run_imagefs("capture", src, img, "--name", "z")
    return img


@pytest.fixture
def both(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """both(args, **kw) -> (zygote's CompletedProcess, a fresh process's)."""

    def run(args: list[str], **kw: object) -> tuple[subprocess.CompletedProcess[bytes], ...]:
        monkeypatch.delenv(cli_zygote.FRESH_ENV, raising=False)
        z = cli_zygote.run(args, **kw)  # type: ignore[arg-type]
        monkeypatch.setenv(cli_zygote.FRESH_ENV, "1")
        f = cli_zygote.run(args, **kw)  # type: ignore[arg-type]
        monkeypatch.delenv(cli_zygote.FRESH_ENV)
        return z, f

    yield run


def same(z: subprocess.CompletedProcess[bytes], f: subprocess.CompletedProcess[bytes]
         ) -> None:
    assert (z.returncode, z.stdout, z.stderr) == (f.returncode, f.stdout, f.stderr)


def test_the_zygote_serves_this_session() -> None:
    p = cli_zygote.popen(["info", "/nonexistent"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert isinstance(p, cli_zygote.CliProcess), "commands run as fresh processes"
    p.communicate()
    assert p.returncode == 3


@pytest.mark.parametrize("args", [
    ["info", "{img}", "--json"],
    ["info", "{img}", "1", "--history"],
    ["ls", "{img}", "1", "/", "-lR"],
    ["cat", "{img}", "z", "/d/big.bin"],
    ["verify", "{img}"],
    ["info", "/nonexistent.imagefs"],  # exit 3
    ["ls"],  # a usage error: argparse's usage and exit 2
    ["info", "{img}", "--no-such-option"],
    ["--version"],
    ["mounts", "--json"],
], ids=lambda a: "-".join(a).replace("{img}", "IMG"))
def test_same_as_a_fresh_process(image: Path, both, args: list[str]) -> None:
    z, f = both([a.format(img=image) for a in args])
    same(z, f)


def test_arguments_cwd_and_bytes(image: Path, both, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image.parent)
    z, f = both(["cat", image.name, "1", os.fsdecode(b"/caf\xe9")])
    same(z, f)
    assert z.returncode == 0 and z.stdout == b"latin-1 name\n"


def test_environment_reaches_the_command(image: Path, both, tmp_path: Path) -> None:
    sock = tmp_path / "nobody-listens.sock"
    env = {**os.environ, "IMAGEFS_SOCKET": str(sock)}
    z, f = both(["delete", str(image), "1", "--daemon"], env=env)
    same(z, f)
    assert z.returncode != 0 and str(sock).encode() in z.stderr


def test_umask_and_files_written(image: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(0o077)
    try:
        made = {}
        for how in ("zygote", "fresh"):
            if how == "fresh":
                monkeypatch.setenv(cli_zygote.FRESH_ENV, "1")
            out = tmp_path / f"{how}.imagefs"
            r = cli_zygote.run(["export", str(image), "1", str(out), "--no-daemon"])
            assert r.returncode == 0, r.stderr
            made[how] = (out.stat().st_mode & 0o777, r.stdout.replace(b"zygote", b"fresh"))
    finally:
        os.umask(old)
    assert made["zygote"] == made["fresh"]


def test_memory_limit_and_a_kill(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RLIMIT_AS is set for the command; SIGKILL through the process object ends it and
    its code says so, as for a fresh process."""
    for fresh in (False, True):
        if fresh:
            monkeypatch.setenv(cli_zygote.FRESH_ENV, "1")
        p = cli_zygote.popen(["cat", str(image), "1", "/d/big.bin"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, rlimit_as=1 << 30)
        assert isinstance(p, cli_zygote.CliProcess) != fresh
        assert p.stdout is not None and p.stdout.read(1)  # running: it blocks on the pipe
        limits = Path(f"/proc/{p.pid}/limits").read_text()
        assert "Max address space" in limits and str(1 << 30) in limits
        p.kill()
        assert p.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("rw", [False, True], ids=["ro", "rw"])
def test_a_mount_started_from_the_zygote(image: Path, tmp_path: Path, rw: bool) -> None:
    """Mount processes and their guardians name themselves (setproctitle) as they do when
    the command was a fresh process (tests find guardians by that title: conftest.settle),
    and the C shim is beneath pyfuse3: the fast paths are on (the zygote of mounting verbs
    has trio imported, never pyfuse3, which must come after the shim)."""
    mnt = tmp_path / "mnt"
    with mounted(image, "1", mnt, *(["--rw"] if rw else [])) as rec:
        title = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().rstrip(b"\0")
        assert title == f"imagefs mount {image} 1 {mnt}".encode()
        assert len(guardians_of(mnt)) == 1
        log = Path(rec["log"]).read_text()
        assert "mounted" in log and "WARNING" not in log and "fast paths off" not in log, log
    assert not is_mounted(mnt)
