"""One writer at a time: concurrent writers serialize on the file lock; readers never wait.

Two captures into one file run one after the other and both land; `--wait 0` against a
held lock fails at once with exit code 6; two captures that both create a new file both
land in the same file.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import time
from pathlib import Path

import cli_zygote
import pytest

from imagefs.image import Image
from imagefs.verify import verify

INTERNAL_ERROR = 70
BUSY = 6


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_TEST_")}


def run_cli(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    p = cli_zygote.run([str(a) for a in args], timeout=timeout, env=_env())
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    assert p.returncode != INTERNAL_ERROR, p.stderr.decode(errors="replace")
    return p


def start(*args: object) -> cli_zygote.Process:
    return cli_zygote.popen([str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())


def finish(proc: cli_zygote.Process, timeout: float = 60) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    text = err.decode(errors="replace")
    assert "Traceback" not in text, text
    assert proc.returncode != INTERNAL_ERROR, text
    return proc.returncode, text


def _tree(root: Path, seed: int, mib: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(mib):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(1 << 20))
    (root / "name.txt").write_text(f"tree {seed}\n")
    return root


def _check(img: Path, names: set[str], trees: dict[str, Path]) -> None:
    report = verify(str(img))
    assert report.ok, report.problems
    with Image.open(str(img)) as image:
        assert {e.name for e in image.indices} == names
        for name in names:
            view = image.view(name)
            for path in sorted(trees[name].iterdir()):
                data = path.read_bytes()
                assert view.read(view.lookup("/" + path.name), 0, len(data)) == data


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("locking")
    return {name: _tree(base / name, seed, 12)
            for seed, name in enumerate(["a", "b", "c", "d"])}


def test_two_captures_at_once(trees: dict[str, Path], tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    p = run_cli("capture", trees["c"], img, "--name", "c", "--level", "1")
    assert p.returncode == 0, p.stderr
    procs = [start("capture", trees[n], img, "--name", n, "--level", "12") for n in "ab"]
    results = [finish(p) for p in procs]
    for code, err in results:
        assert code == 0, err
    _check(img, {"a", "b", "c"}, trees)


def test_two_captures_create_the_same_new_file(trees: dict[str, Path], tmp_path: Path
                                               ) -> None:
    for round_ in range(3):
        img = tmp_path / f"new-{round_}.ifs"
        procs = [start("capture", trees[n], img, "--name", n, "--level", "1") for n in "ab"]
        for code, err in (finish(p) for p in procs):
            assert code == 0, err
        _check(img, {"a", "b"}, trees)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"temporary files left behind: {leftovers}"


class HeldLock:
    """The writer lock, held by this test process (as another writer would)."""

    def __init__(self, img: Path) -> None:
        self.fd = os.open(img, os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.fixture()
def locked_image(trees: dict[str, Path], tmp_path: Path):  # noqa: ANN201
    img = tmp_path / "image.ifs"
    p = run_cli("capture", trees["c"], img, "--name", "c", "--level", "1")
    assert p.returncode == 0, p.stderr
    lock = HeldLock(img)
    try:
        yield img, lock
    finally:
        lock.release()


@pytest.mark.parametrize("verb", ["capture", "delete"])
@pytest.mark.parametrize("wait", ["0", "0.5"])
def test_wait_limit_on_a_locked_file(locked_image: tuple[Path, HeldLock],
                                     trees: dict[str, Path], verb: str, wait: str) -> None:
    img, _lock = locked_image
    before = img.read_bytes()
    args = (["capture", trees["d"], img, "--name", "d"] if verb == "capture"
            else ["delete", img, "c"])
    t0 = time.monotonic()
    p = run_cli(*args, "--wait", wait)
    elapsed = time.monotonic() - t0
    assert p.returncode == BUSY, p.stderr
    lines = p.stderr.decode().splitlines()
    assert lines and lines[-1].startswith("imagefs: "), lines
    assert "lock" in lines[-1] and str(img) in lines[-1], lines
    assert elapsed >= float(wait), elapsed
    assert elapsed < float(wait) + 5, elapsed
    assert img.read_bytes() == before, "a writer that never got the lock changed the file"
    # An error is one line: no "waiting for another writer" note before a refusal
    # when the caller asked not to wait.
    if wait == "0":
        assert len(lines) == 1, f"expected one line on stderr, got {lines}"


def test_readers_do_not_wait_for_a_writer(locked_image: tuple[Path, HeldLock]) -> None:
    img, _lock = locked_image
    for args in (["info", img, "--json"], ["ls", img, "c"], ["cat", img, "c", "/name.txt"],
                 ["verify", img], ["diff", img, "1", "1"]):
        p = run_cli(*args, timeout=20)
        assert p.returncode == 0, (args, p.stderr)
    assert json.loads(run_cli("info", img, "--json").stdout)["indices"][0]["name"] == "c"


def test_a_waiting_writer_goes_on_when_the_lock_is_released(
        locked_image: tuple[Path, HeldLock], trees: dict[str, Path]) -> None:
    img, lock = locked_image
    proc = start("capture", trees["a"], img, "--name", "a", "--level", "1")
    time.sleep(1.0)
    assert proc.poll() is None, "the capture did not wait for the lock"
    lock.release()
    code, err = finish(proc)
    assert code == 0, err
    assert "waiting for another writer" in err
    _check(img, {"a", "c"}, trees)
