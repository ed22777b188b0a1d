"""A push's or a pull's temporary folder (a bundle being written or read), named by its
process, so that `imagefs cleanup --all` can remove those of killed ones: a SIGKILL gives
no chance to remove it, and the folder holds a bundle (up to tens of MB)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from imagefs.mount.kernel import pid_alive

KINDS = ("pull", "push")
NAME = re.compile(r"imagefs-(pull|push)-(\d+)-[A-Za-z0-9_]+\Z")


@contextmanager
def scratch(kind: str) -> Iterator[str]:
    """A new folder imagefs-KIND-PID-XXXX in the temporary directory, removed afterwards."""
    assert kind in KINDS
    with tempfile.TemporaryDirectory(prefix=f"imagefs-{kind}-{os.getpid()}-") as folder:
        yield folder


def cleanup_scratch() -> list[str]:
    """Remove the folders of pushes and pulls whose process is gone; those removed.  Only
    this user's (a folder of another's is left to its owner and the system's cleaner)."""
    base = tempfile.gettempdir()
    gone = []
    for name in sorted(os.listdir(base)):
        found = NAME.match(name)
        path = os.path.join(base, name)
        if found is None or pid_alive(int(found.group(2))):
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone
