"""The `imagefs` command line: one module per verb, each with `register(subparsers)`.

The outermost layer: it may import the daemon's client, servicing and the whole imagefs
library; nothing imports it.

Every error a user can cause ends as one line `imagefs: <message>` on stderr and the error
class's exit code (see imagefs.errors and docs/cli.md); never a traceback, unless
IMAGEFS_DEBUG=1 asks for one.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import importlib
import os
import sys
import threading
from collections.abc import Sequence

from imagefs.errors import INTERNAL_ERROR, Error, Interrupted, SystemFailure, one_line

# Verb modules in the order `--help` lists them; only the verb asked for is imported (the
# others' imports would cost every command a tenth of a second).
VERBS = ["capture", "info", "ls", "cat", "extract", "apply", "verify", "delete", "export",
         "optimize", "push", "pull", "gc", "diff", "mount", "unmount", "mounts", "commit",
         "remount", "cleanup", "package", "health", "firstboot", "generalize", "feature",
         "driver", "daemon"]



# Allocations between two collections of the youngest generation (Python's default: 700).
# A command is short and acyclic: its imports and plan allocate ~100 000 objects that live
# until it ends, and at 700 the collector traversed them 60 times in `package add` of hello
# (8-9 ms of its 0.30 s; at 50 000, not once).  Processes it forks keep it.
YOUNG_COLLECTION_AFTER = 50_000


class _Version(argparse.Action):
    """--version: `imagefs VERSION`, the version looked up only when asked for (reading
    the package's metadata would cost every command its import)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS,
                 help: str = "show program's version number and exit") -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        import imagefs

        print(f"imagefs {imagefs.__version__}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"imagefs: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only` (the verb the words start with), just that verb's: the
    others are never chosen, and neither imported nor built (31 parsers built cost ~2 ms of
    every command; the top-level usage, which would list them, is not shown when a known
    verb comes first)."""
    parser = _Parser(
        prog="imagefs",
        description="Keep many operating-system images (indices) in one deduplicated, "
                    "zstd-compressed image file; capture, inspect, mount, apply, verify, export, "
                    "service offline, and share through an S3 object store.",
        epilog="An INDEX is a number (from 1) or a name. `imagefs VERB --help` explains a "
               "verb. Exit codes: 0 ok, 1 damage found, 2 usage, 3 not found, "
               "4 bad or damaged image, 5 newer format, 6 locked, 7 destination, "
               "8 system error, 9 servicing failed (nothing changed), 70 internal error, "
               "130 interrupted.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS if only is None else [only]:
        importlib.import_module(f"{__name__}.{verb}_cmd").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    verb = words[0] if words and words[0] in VERBS else None
    args = build_parser(verb).parse_args(words)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return int(code or 0)
    except Error as e:
        return _fail(e.message(), e.exit_code)
    except KeyboardInterrupt:
        return _fail(Interrupted().message(), Interrupted.exit_code)
    except BrokenPipeError:
        # The reader went away (`imagefs ls ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        if os.environ.get("IMAGEFS_DEBUG"):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fail(f"{e.filename or ''}: no space left on device", SystemFailure.exit_code)
        return _fail(f"{e.filename or ''}: {e.strerror}", SystemFailure.exit_code)
    except Exception as e:  # the last boundary: one line, a distinct code
        if os.environ.get("IMAGEFS_DEBUG"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e} (IMAGEFS_DEBUG=1 shows more)",
                     INTERNAL_ERROR)


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(f"imagefs: {one_line(message)}", file=sys.stderr)
    return code


def run() -> None:
    gc.set_threshold(YOUNG_COLLECTION_AFTER, *gc.get_threshold()[1:])
    code = main()
    _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, which frees every imported
    module one by one: 15-20 ms of an 80 ms `imagefs commit` (12 interleaved runs each).
    Only when nothing is left to wait for: no other thread, output flushed; the atexit
    handlers (logging, temporary files) still run.  Otherwise return, for sys.exit."""
    if threading.active_count() != 1:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return  # a closed pipe: let the normal exit deal with it
    atexit._run_exitfuncs()
    os._exit(code)
