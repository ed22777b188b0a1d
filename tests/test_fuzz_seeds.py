"""The fuzz harness stays true to the decoders: every seed of fuzz/corpus goes through its
target (scripts/fuzz_targets.py, without atheris) with no crash, only imagefs errors.

The fuzzing itself (scripts/fuzz, coverage-guided, minutes to hours) is not part of the
test run; this keeps the targets and their seeds from rotting between runs."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from imagefs.errors import Error

REPO = Path(__file__).resolve().parent.parent


def _targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_targets",
                                                  REPO / "scripts" / "fuzz_targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TARGETS = _targets()


@pytest.mark.parametrize("target", TARGETS.TARGETS)
def test_seeds_pass_through_their_target(target: str) -> None:
    seeds = sorted((REPO / "fuzz" / "corpus" / target).iterdir())
    assert seeds, f"no seeds for {target}"
    fn = TARGETS._load()[target]
    for seed in seeds:
        # A clear error is a fine answer; anything else fails the test.
        with contextlib.suppress(Error):
            fn(seed.read_bytes())
