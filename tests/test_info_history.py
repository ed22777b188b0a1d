"""info --history shows any history entry on one bounded line: an entry is the image's
(anybody's) data, whatever shape its result has."""

from __future__ import annotations

from typing import Any

import pytest

from imagefs.cli.info_cmd import HISTORY_VALUE, _detail


@pytest.mark.parametrize("result", [
    {"removed": 3, "added": "x"},
    {"added": [{"package": "jq", "version": "1.6"}, 7, None], "removed": {"a": 1}},
    {"paths_removed": 12, "operations": [{"name": "logfiles"}]},
    {"added": None},
])
def test_a_result_of_any_shape_is_one_bounded_line(result: dict[str, Any]) -> None:
    line = _detail("result", result)
    assert "\n" not in line and len(line) <= HISTORY_VALUE * 4


def test_packages_are_shown_as_name_and_version() -> None:
    line = _detail("result", {"added": [{"package": "jq", "version": "1.6-2.1"}]})
    assert line == "added jq=1.6-2.1"
