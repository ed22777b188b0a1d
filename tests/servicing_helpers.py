"""What the servicing tests share: the fixture packages, the skip marker for machines
without root or systemd-nspawn, and checks of an image's state."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from imagefs.errors import NoSuchPath
from imagefs.image import Image
from servicing.packages import list_packages

# ../shared/fixtures/debs beside the repository, or $IMAGEFS_FIXTURES/debs.
DEBS = Path(os.environ.get("IMAGEFS_FIXTURES", REPO.parent / "shared/fixtures")) / "debs"
HELLO = DEBS / "hello_2.10-3_amd64.deb"
JQ_VERSION = "1.6-2.1+deb12u3"
JQ = DEBS / f"jq_{JQ_VERSION}_amd64.deb"

NEEDS_NSPAWN = pytest.mark.skipif(
    shutil.which("systemd-nspawn") is None or os.geteuid() != 0,
    reason="needs root and systemd-nspawn (systemd-container)")
NEEDS_DEBS = pytest.mark.skipif(not DEBS.is_dir(), reason=f"no fixture packages in {DEBS}")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hello_state(image: Path, index: str = "1") -> str:
    """'new' if hello is installed in the index (its file and its dpkg database agree),
    'old' if neither has it; fails on anything in between."""
    with Image.open(str(image)) as img:
        try:
            img.view(index).lookup("/usr/bin/hello")
            has_file = True
        except NoSuchPath:
            has_file = False
    installed = {p.name: p.state for p in list_packages(str(image), index).packages}
    assert has_file == (installed.get("hello") == "installed"), (has_file, installed)
    return "new" if has_file else "old"
