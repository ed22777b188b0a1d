"""Errors that explain themselves.

Each class's docstring is its message (formatted with the constructor's arguments) and each
carries a stable exit code, so that scripts can tell "no such index" from "the file is
damaged".  The CLI prints ``imagefs: <message>`` on one line and exits with the code;
docs/cli.md holds the table, generated from this module by ``error_table()`` and checked by
a test.
"""

from __future__ import annotations

from typing import ClassVar

# The exit code of an error that is none of these: a bug in imagefs (the CLI's last
# boundary, and a mount request the daemon's fork server could not answer otherwise).
INTERNAL_ERROR = 70


class Error(Exception):
    """Error: {}"""

    exit_code: ClassVar[int] = 1

    def message(self) -> str:
        """The docstring's first line filled with the arguments, on one line: a control
        character (a newline in a crafted file name, say) is shown escaped, as `\n`."""
        doc = (self.__doc__ or "{}").strip().splitlines()[0]
        try:
            text = doc.format(*self.args)
        except (IndexError, KeyError, ValueError):
            text = f"{doc} {self.args}"
        return one_line(text)

    def __str__(self) -> str:
        return self.message()

    def detail(self) -> str:
        """What is wrong, for an error that wraps this one (which names the file itself)."""
        return self.message()


_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {
    ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def one_line(text: str) -> str:
    """text with its control characters escaped (`\\n`, `\\x01`): one line on a terminal."""
    return text.translate(_ESCAPES)


class UsageError(Error):
    """{}"""

    exit_code = 2


class NotFound(Error):
    """{}"""

    exit_code = 3


class NoSuchImage(NotFound):
    """{}: no such image file"""


class NoSuchIndex(NotFound):
    """{}: no index {!r} (the image has {} indices; see `imagefs info`)"""


class NoSuchPath(NotFound):
    """index {}: no such path in the image: {}"""


class NotADirectory(NotFound):
    """index {}: not a directory in the image: {}"""


class FormatError(Error):
    """{}: {}"""

    exit_code = 4


class NotAnImage(FormatError):
    """{}: not an imagefs image ({})"""


class UnsupportedVersion(FormatError):
    """{}: format version {} is newer than this imagefs understands (up to {}); upgrade imagefs"""

    exit_code = 5


class CorruptImage(FormatError):
    """{}: damaged or hostile image: {}"""

    def detail(self) -> str:
        return one_line(str(self.args[-1]))


class StoreCorrupt(CorruptImage):
    """{}: damaged or hostile store: {}"""


class ChecksumMismatch(CorruptImage):
    """{}: checksum mismatch in {}"""

    def detail(self) -> str:
        return one_line(f"checksum mismatch in {self.args[-1]}")


class DamageFound(Error):
    """{}: verify found {} problem(s)"""

    exit_code = 1


class Busy(Error):
    """{}: another writer holds the image's lock ({})"""

    exit_code = 6


class DestinationError(Error):
    """{}: {}"""

    exit_code = 7


class SystemFailure(Error):
    """{}: {}"""

    exit_code = 8


class SourceError(SystemFailure):
    """{}: cannot capture: {}"""


class StoreFailed(SystemFailure):
    """{}: {}"""


class NoSuchObject(NotFound):
    """{}: {}"""


class NotAMountPoint(NotFound):
    """{}: not an imagefs mount (see `imagefs mounts`)"""


class AlreadyMounted(DestinationError):
    """{}: already an imagefs mount (of {}); unmount it first"""


class BadMountPoint(DestinationError):
    """{}: cannot mount here: {}"""


class MountPointBusy(Busy):
    """{}: busy, not unmounted: {}"""


class MountFailed(SystemFailure):
    """{}: mount failed: {}"""


class NoSuchSession(NotFound):
    """{}: no such session (see `imagefs mounts`)"""


class IndexGone(NotFound):
    """{}: index {!r} is no longer in the image; commit with --new-index NAME"""


class BaseChanged(Busy):
    """{}: index {!r} was committed from elsewhere since this session opened; commit with --new-index NAME to keep both"""  # noqa: E501


class ChangedWhilePlanned(Busy):
    """{}: index {} was changed by another writer while it was being planned; run the verb again"""  # noqa: E501


class SessionLive(Busy):
    """session {}: mounted by process {} at {}; unmount it first"""


class ImageReplaced(Busy):
    """{}: replaced (imagefs optimize) or removed while this waited for it; run the command again"""  # noqa: E501


class SessionsOpen(Busy):
    """{}: {} session(s) of it are open ({}); commit or discard them first (imagefs mounts)"""  # noqa: E501


class MountRefused(SystemFailure):
    """{}"""

    # exit_code: the code of the refusal by a mount process, or by the process that
    # started it (a system failure's, 8, when it gives none)

    def __init__(self, message: str, code: int = SystemFailure.exit_code) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


class DaemonRefused(SystemFailure):
    """{}"""

    # exit_code: the code the daemon's answer carries (a system failure's, 8, when it
    # gives none); output: what a failing program of the image printed (servicing)

    def __init__(self, message: str, code: int = SystemFailure.exit_code,
                 output: str = "") -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]
        self.output = output


class Refused(UsageError):
    """{}"""

    # A servicing change that cannot be made, said before anything changed.


class NotAModule(Refused):
    """{}"""

    # A file given or found as a kernel module is not one (not ELF, truncated, damaged
    # compressed data, no .modinfo): said before anything changed.


class ServicingFailed(Error):
    """{}"""

    # A program of the image (dpkg, a maintainer script) or the check after it failed
    # while an index was being serviced; the transaction was discarded, nothing changed.
    exit_code = 9

    def __init__(self, what: str, output: str = "") -> None:
        """what: one line; output: what the failing program printed (shown below it)."""
        super().__init__(what)
        self.what, self.output = what, output


class Interrupted(Error):
    """interrupted; the image is unchanged"""

    exit_code = 130


def error_classes() -> list[type[Error]]:
    """Every error class, breadth-first from Error (for the docs table and its test)."""
    found: list[type[Error]] = []
    pending: list[type[Error]] = [Error]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def error_table() -> str:
    """The markdown table of error classes and exit codes in docs/cli.md."""
    rows = ["| exit code | error | meaning |", "| --- | --- | --- |"]
    for cls in error_classes():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append(f"| {cls.exit_code} | `{cls.__name__}` | {doc} |")
    return "\n".join(rows)
