"""What the verbs share: progress bars, byte formatting, output of raw path bytes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


HELP_COMPACT = ("the compact profile: 8 MiB packs at zstd 19 (unless --level), content "
                "stored by kind and name so like files share a pack; 10-20%% smaller "
                "than the default, slower to write, and a small file read decompresses "
                "up to 8 MiB")


def add_wait(parser: Any) -> None:
    """--wait SECONDS, for the verbs that take an image's writer lock."""
    parser.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                        help="wait at most this long for another writer (default: wait)")


def add_recompress(parser: Any) -> None:
    """--level and --compact of the verbs that copy packs as stored (export, optimize)."""
    parser.add_argument("--level", type=int,
                        help="recompress every chunk at this zstd level, 1-22 (default: "
                             "copy whole packs as stored)")
    add_compact(parser, "every chunk is recompressed")
    parser.add_argument("--check", action="store_true",
                        help="also decompress every pack copied as stored and check each "
                             "chunk's xxh3-128, as `wimexport --check` checks: slower (about "
                             "twice as long), and catches a pack altered under a recomputed "
                             "frame checksum, which a plain copy passes on (readers refuse "
                             "its chunks; `imagefs verify` finds it). Frame checksums are "
                             "always checked")


def add_compact(parser: Any, what: str) -> None:
    """--compact, the compact profile; what: what it means for this verb."""
    parser.add_argument("--compact", action="store_true", help=f"{HELP_COMPACT}; {what}")


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def write_path(path: bytes, end: bytes = b"\n") -> None:
    """Paths are bytes in an image; print them as they are (non-UTF-8 included)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(path + end)


class Progress:
    """A rich progress bar on a terminal (stderr), nothing otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._task: Any = None

    def total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=max(n, 1))

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n)


@contextmanager
def progress(label: str, enabled: bool = True) -> Iterator[Progress]:
    p = Progress(label)
    if not enabled or not sys.stderr.isatty():
        yield p
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    with Bar("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
             TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
             transient=True) as bar:
        p._bar = bar
        p._task = bar.add_task(label, total=None)
        yield p


def waiting_note(path: str) -> Callable[[], None]:
    def note() -> None:
        print(f"imagefs: waiting for another writer to finish with {path}", file=sys.stderr)
    return note


def add_json(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
