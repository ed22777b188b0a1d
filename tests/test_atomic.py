"""Kill -9 at any moment leaves the old state or the new one, never a mix.

Design requirement 4.  (a) At each named point of a publication (IMAGEFS_TEST_CRASH_AT) a
capture and a delete die by SIGKILL; (b) a capture or delete is killed after a random
delay, many times.  Afterwards: verify is clean, the index list is exactly the old one or
exactly the new one, the old indices keep their digests and content, and the next writer
carries on from there (cutting the dead writer's leftovers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cli_zygote
import pytest

from imagefs.format import layout as F
from imagefs.image import Image
from imagefs.verify import verify

INTERNAL_ERROR = 70
CONTAINER_POINTS = ["before-commit-frame", "before-fsync", "before-slot", "after-slot"]
WRITER_POINTS = ["after-packs", "after-metadata"]  # capture only: delete writes no data
PUBLISHED = {"after-slot"}  # the slot write is durable: the new state is the state
BIG_LEVEL = "12"  # slow enough that a 40 MiB capture takes ~0.5-1 s to kill into


def _env(crash_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFS_TEST_")}
    if crash_at:
        env["IMAGEFS_TEST_CRASH_AT"] = crash_at
    return env


def run_cli(*args: object, crash_at: str | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[bytes]:
    p = cli_zygote.run([str(a) for a in args], timeout=timeout, env=_env(crash_at))
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    assert p.returncode != INTERNAL_ERROR, p.stderr.decode(errors="replace")
    return p


def info(img: Path) -> list[dict]:
    p = run_cli("info", img, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["indices"]


def kill_after(args: list[object], delay: float) -> int:
    """Run the CLI with args and SIGKILL it after delay seconds unless it ended before;
    its exit code (0, or -SIGKILL): anything else, or a traceback, fails the test."""
    proc = cli_zygote.popen([str(a) for a in args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert proc.returncode in (0, -signal.SIGKILL), (proc.returncode, err)
    return proc.returncode


def state(img: Path) -> list[tuple[str, str]]:
    """(name, digest) of every index, read in process."""
    with Image.open(str(img)) as image:
        return [(e.name, e.digest) for e in image.indices]


def assert_clean(img: Path) -> None:
    report = verify(str(img))
    assert report.ok, report.problems


def _write_files(root: Path, rng: random.Random, count: int, size: int, tag: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # random-ish: random blocks, some repeated (dedup and compression have work to do)
        block = rng.randbytes(64 * 1024)
        parts = [block if rng.random() < 0.3 else rng.randbytes(64 * 1024)
                 for _ in range(size // (64 * 1024))]
        (root / f"{tag}-{i}.bin").write_bytes(b"".join(parts))
    (root / "sub").mkdir(exist_ok=True)
    for i in range(20):
        (root / "sub" / f"{tag}-{i}.txt").write_text(f"{tag} small file {i}\n" * (i + 1))


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("atomic")
    rng = random.Random(11)
    out = {"base": base / "base", "small": base / "small", "big": base / "big"}
    _write_files(out["base"], rng, 4, 300 * 1024, "base")
    _write_files(out["small"], rng, 3, 200 * 1024, "small")
    _write_files(out["big"], rng, 20, 2 * 1024 * 1024, "big")  # 40 MiB
    return out


@pytest.fixture(scope="module")
def base_image(trees: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("atomic-img") / "base.ifs"
    p = run_cli("capture", trees["base"], img, "--name", "base", "--level", "3")
    assert p.returncode == 0, p.stderr
    return img


@pytest.fixture(scope="module")
def two_image(trees: dict[str, Path], base_image: Path) -> Path:
    img = base_image.parent / "two.ifs"
    shutil.copyfile(base_image, img)
    p = run_cli("capture", trees["small"], img, "--name", "small", "--level", "3")
    assert p.returncode == 0, p.stderr
    return img


def _check_base_files(img: Path, index: str, src: Path) -> None:
    """Every file of the index reads back equal to its source (in process), and one
    through the CLI."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    with Image.open(str(img)) as image:
        view = image.view(index)
        for path in files:
            data = path.read_bytes()
            rel = "/" + str(path.relative_to(src))
            assert view.read(view.lookup(rel), 0, len(data) + 1) == data, rel
    p = run_cli("cat", img, index, "/" + str(files[0].relative_to(src)))
    assert p.returncode == 0 and p.stdout == files[0].read_bytes(), p.stderr


# ---- (a) named crash points -------------------------------------------------------------


@pytest.mark.parametrize("point", CONTAINER_POINTS + WRITER_POINTS)
def test_capture_killed_at(point: str, trees: dict[str, Path], base_image: Path,
                           tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(base_image, img)
    before = info(img)
    p = run_cli("capture", trees["small"], img, "--name", "new", "--level", "3",
                crash_at=point)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert_clean(img)
    after = info(img)
    if point in PUBLISHED:
        assert [e["name"] for e in after] == ["base", "new"]
    else:
        assert after == before, "a capture that died unpublished changed the indices"
    assert after[0]["digest"] == before[0]["digest"]
    _check_base_files(img, "base", trees["base"])
    # The next writer carries on: it cuts the leftovers and publishes after them.
    p = run_cli("capture", trees["small"], img, "--name", "again", "--level", "1")
    assert p.returncode == 0, p.stderr
    assert [e["name"] for e in info(img)] == [e["name"] for e in after] + ["again"]
    assert_clean(img)
    _check_base_files(img, "again", trees["small"])


@pytest.mark.parametrize("point", CONTAINER_POINTS)
def test_delete_killed_at(point: str, trees: dict[str, Path], two_image: Path,
                          tmp_path: Path) -> None:
    img = tmp_path / "image.ifs"
    shutil.copyfile(two_image, img)
    before = info(img)
    p = run_cli("delete", img, "base", crash_at=point)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert_clean(img)
    after = info(img)
    if point in PUBLISHED:
        assert [(e["name"], e["digest"]) for e in after] == [
            (before[1]["name"], before[1]["digest"])]
    else:
        assert after == before
        _check_base_files(img, "base", trees["base"])
    _check_base_files(img, "small", trees["small"])
    p = run_cli("delete", img, "small")
    assert p.returncode == 0, p.stderr
    assert_clean(img)


@pytest.mark.parametrize("point", WRITER_POINTS)
def test_delete_passes_writer_points(point: str, two_image: Path, tmp_path: Path) -> None:
    """A delete writes no packs or metadata: the capture-only points never fire."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(two_image, img)
    p = run_cli("delete", img, "1", crash_at=point)
    assert p.returncode == 0, p.stderr
    assert [e["name"] for e in info(img)] == ["small"]


@pytest.mark.parametrize("cut", [0, 16, 24, 40, 56])
def test_torn_slot_write_falls_back_to_the_previous_state(
        cut: int, trees: dict[str, Path], two_image: Path, tmp_path: Path) -> None:
    """Power loss in the middle of the 64-byte slot write: the slot fails its checksum and
    the previous generation (in the other slot) is the state; the next writer goes on."""
    img = tmp_path / "image.ifs"
    shutil.copyfile(two_image, img)
    before = state(img)
    with open(img, "rb") as fh:
        header_before = fh.read(F.HEADER_SIZE)
    p = run_cli("capture", trees["big"], img, "--name", "new", "--level", "1")
    assert p.returncode == 0, p.stderr
    with open(img, "r+b") as fh:
        header_after = fh.read(F.HEADER_SIZE)
        changed = [o for o in F.SLOT_OFFSETS
                   if header_before[o:o + F.SLOT_SIZE] != header_after[o:o + F.SLOT_SIZE]]
        assert len(changed) == 1, "one publication writes one slot"
        o = changed[0]
        torn = header_after[o:o + cut] + header_before[o + cut:o + F.SLOT_SIZE]
        fh.seek(o)
        fh.write(torn)
    assert state(img) == before
    report = verify(str(img))
    if cut == 0:  # the slot write never happened: just the old state
        assert report.ok, report.problems
    else:
        assert [p.what for p in report.problems] == [
            f"root slot {'AB'[F.SLOT_OFFSETS.index(o)]} is damaged (checksum mismatch)"]
    p = run_cli("capture", trees["small"], img, "--name", "again", "--level", "1")
    assert p.returncode == 0, p.stderr
    assert [n for n, _ in state(img)] == [n for n, _ in before] + ["again"]
    assert_clean(img)


# ---- (b) kills at random moments --------------------------------------------------------


class Killer:
    """Starts captures and deletes and kills them after a random delay."""

    def __init__(self, trees: dict[str, Path], base_image: Path, two_image: Path,
                 work: Path, seed: int) -> None:
        self.trees = trees
        self.base_image = base_image
        self.two_image = two_image
        self.work = work
        self.rng = random.Random(seed)
        self.outcomes: dict[str, int] = {}
        self.capture_time = self._measure()

    def _measure(self) -> float:
        img = self.work / "measure.ifs"
        shutil.copyfile(self.base_image, img)
        start = time.monotonic()
        p = run_cli("capture", self.trees["big"], img, "--name", "big",
                    "--level", BIG_LEVEL)
        assert p.returncode == 0, p.stderr
        elapsed = time.monotonic() - start
        self.new_capture_state = state(img)
        img.unlink()
        return elapsed

    def _kill_after(self, args: list[object], delay: float) -> int:
        return kill_after(args, delay)

    def round(self, img: Path) -> None:
        """One kill.  img carries over from the previous round while it is in its old
        state (so the leftovers of a killed writer meet the next writer)."""
        if self.rng.random() < 0.75:
            if not img.exists() or [n for n, _ in state(img)] != ["base"]:
                shutil.copyfile(self.base_image, img)
            old = state(img)
            assert [n for n, _ in old] == ["base"]
            delay = self.rng.uniform(0.05, self.capture_time * 1.5)
            code = self._kill_after(["capture", self.trees["big"], img, "--name", "big",
                                     "--level", BIG_LEVEL], delay)
            new = self.new_capture_state
            what = "capture"
        else:
            shutil.copyfile(self.two_image, img)
            old = state(img)
            delay = self.rng.uniform(0.05, 0.8)
            code = self._kill_after(["delete", img, "base"], delay)
            new = old[1:]
            what = "delete"
        assert_clean(img)
        now = state(img)
        assert now in (old, new), f"{what} killed after {delay:.3f}s: {now}"
        if code == 0:
            assert now == new, f"{what} exited 0 but the state is the old one"
        outcome = f"{what} {'new' if now == new else 'old'}"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def _random_kills(n: int, trees: dict[str, Path], base_image: Path, two_image: Path,
                  work: Path, seed: int) -> dict[str, int]:
    killer = Killer(trees, base_image, two_image, work, seed)
    img = work / "random.ifs"
    for _ in range(n):
        killer.round(img)
    # After all that, a last writer still works on whatever state was left.
    p = run_cli("capture", trees["small"], img, "--name", "last", "--level", "1")
    assert p.returncode == 0, p.stderr
    assert_clean(img)
    print(f"\n{n} kills (full capture {killer.capture_time:.2f}s): {killer.outcomes}")
    return killer.outcomes


def test_random_kills(trees: dict[str, Path], base_image: Path, two_image: Path,
                      tmp_path: Path) -> None:
    outcomes = _random_kills(30, trees, base_image, two_image, tmp_path,
                             seed=int(os.environ.get("IMAGEFS_KILL_SEED", "1")))
    assert outcomes.get("capture old", 0) > 0, "no capture was killed before publishing"


@pytest.mark.slow
def test_random_kills_many(trees: dict[str, Path], base_image: Path, two_image: Path,
                           tmp_path: Path) -> None:
    outcomes = _random_kills(300, trees, base_image, two_image, tmp_path,
                             seed=random.randrange(1 << 30))
    assert outcomes.get("capture old", 0) > 0 and outcomes.get("capture new", 0) > 0
