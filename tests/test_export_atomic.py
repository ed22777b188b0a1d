"""imagefs export killed (issue 16): at the writer's named points and at random moments, a
new DEST is absent or whole, and an existing DEST holds its old state or the new one,
verifying clean either way."""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import run_imagefs
from test_atomic import (
    CONTAINER_POINTS,
    PUBLISHED,
    WRITER_POINTS,
    assert_clean,
    kill_after,
    run_cli,
    state,
)


def _tree(root: Path, seed: int, count: int) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    words = [rng.randbytes(rng.randrange(2, 12)).hex().encode() for _ in range(4000)]
    for i in range(count):
        (root / f"f{i}").write_bytes(b" ".join(rng.choices(words, k=40_000)))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two indices sharing part of their content, ~14 MB each: an export of index 2 takes
    long enough to be killed in the middle."""
    base = tmp_path_factory.mktemp("export-atomic")
    one = _tree(base / "one", 1, 16)
    two = base / "two"
    shutil.copytree(one, two)
    for f in sorted(two.iterdir())[:6]:
        f.unlink()
    _tree(base / "extra", 2, 8)
    for f in (base / "extra").iterdir():
        shutil.copy2(f, two / f"x-{f.name}")
    image = base / "source.imagefs"
    run_imagefs("capture", one, image, "--name", "one")
    run_imagefs("capture", two, image, "--name", "two")
    return image


@pytest.fixture(scope="module")
def existing(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image to export into: index "one" of source, alone."""
    dest = tmp_path_factory.mktemp("export-atomic-dest") / "existing.imagefs"
    run_imagefs("export", source, "one", dest)
    return dest


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return [n for n in os.listdir(directory) if n not in keep]


@pytest.mark.parametrize("point", CONTAINER_POINTS + WRITER_POINTS)
def test_killed_at(point: str, source: Path, existing: Path, tmp_path: Path) -> None:
    wanted = state(source)[1:]
    new = tmp_path / "new.imagefs"
    p = run_cli("export", source, "two", new, crash_at=point)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert not new.exists()  # an unnamed file until the end: nothing to clean up
    assert _leftovers(tmp_path, set()) == []

    into = shutil.copyfile(existing, tmp_path / "into.imagefs")
    before = state(into)
    p = run_cli("export", source, "two", into, crash_at=point)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert_clean(into)
    assert state(into) == (before + wanted if point in PUBLISHED else before)
    assert run_cli("export", source, "two", new).returncode == 0  # and the next one works
    assert state(new) == wanted
    assert_clean(new)


def test_random_kills(source: Path, existing: Path, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("IMAGEFS_KILL_SEED", "5")))
    wanted = state(source)[1:]
    outcomes: dict[str, int] = {}
    into = shutil.copyfile(existing, tmp_path / "into.imagefs")
    # kills spread over one whole export's time, measured here: a fixed range would miss
    # the moments before publishing on a fast machine (or the end on a slow one)
    start = time.perf_counter()
    assert kill_after(["export", source, "two", tmp_path / "timed.imagefs"], 60) == 0
    whole = time.perf_counter() - start
    (tmp_path / "timed.imagefs").unlink()
    for _ in range(20):
        if rng.random() < 0.5:
            dest, before = tmp_path / "new.imagefs", None
            dest.unlink(missing_ok=True)
        else:
            if state(into) != state(existing):
                shutil.copyfile(existing, into)
            dest, before = into, state(into)
        code = kill_after(["export", source, "two", dest], rng.uniform(0.002, whole * 1.3))
        kind = "new" if before is None else "existing"
        if before is None and not dest.exists():
            outcome = "absent"
            assert code != 0
        else:
            assert_clean(dest)
            now = state(dest)
            full = (before or []) + wanted
            assert now in ((before, full) if before is not None else (full,)), now
            outcome = "whole" if now == full else "old"
            if code == 0:
                assert outcome == "whole"
        outcomes[f"{kind} {outcome}"] = outcomes.get(f"{kind} {outcome}", 0) + 1
        assert _leftovers(tmp_path, {"new.imagefs", "into.imagefs"}) == []
    print(f"\n20 kills of export (whole export {whole:.3f} s): {outcomes}")
    assert outcomes.get("new absent", 0) + outcomes.get("existing old", 0) > 0, \
        "no export was killed before publishing"
