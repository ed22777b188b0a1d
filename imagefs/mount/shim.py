"""The C shim beneath pyfuse3 (_fuseshim.c): loading it, and whether its fast paths are on.

Importing this module loads _fuseshim with its symbols global, before pyfuse3 (the shim's
fuse_session_new() must be the one pyfuse3 binds to), then pyfuse3.  The fast paths
reach into pyfuse3's private request loop and into libfuse's structures (docs/shim.md),
so they are used only with the pyfuse3 and libfuse versions the shim was written against
and tested with (PYFUSE3_KNOWN, LIBFUSE_KNOWN); otherwise, when IMAGEFS_NO_FAST_PATHS is
set, or when the shim is not built or out of date, pyfuse3's own handlers answer every
request, and the mount says so in one line of its log (say_once).

What the shim adds besides the fast paths (lseek, fallocate, setxattr flags, symlink
caching, free opens) uses only libfuse's public interface and stays on whenever the shim
is built and current.

Everything here is cheap: no subprocess, no file read; the versions come from pyfuse3's
__version__ (already known once pyfuse3 is imported) and libfuse's fuse_pkgversion().
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

# The interface of _fuseshim this module speaks (SHIM_API in _fuseshim.c).
API = 8
# configure()'s free-opens argument (handles_are_inodes in _fuseshim.c): 0 none, all opens
# (an immutable index: files and directories), or file opens only (a writable mount).
FREE_OPENS_ALL = 1
FREE_OPENS_FILES = 2
# (major, minor) versions the fast paths were written against and tested with; any
# patch release of these.  Add one only after running the tests against it with the fast
# paths on and under the sanitizers (docs/shim.md, "Supporting another version").
PYFUSE3_KNOWN = ((3, 5),)
LIBFUSE_KNOWN = ((3, 14),)
ENV_OFF = "IMAGEFS_NO_FAST_PATHS"
OFF = "fast paths off"  # how the mount log line starts (tests look for it)

log = logging.getLogger("imagefs.mount")


def _load() -> tuple[Any, str]:
    """(_fuseshim, "") or (None, why not)."""
    flags = sys.getdlopenflags()
    try:
        sys.setdlopenflags(flags | os.RTLD_GLOBAL)
        from . import _fuseshim  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"the C shim imagefs.mount._fuseshim is not built ({e})"
    finally:
        sys.setdlopenflags(flags)
    api = getattr(_fuseshim, "API", 1)
    if api != API:
        # Loaded all the same (it cannot be unloaded): unconfigured, it changes nothing.
        return None, (f"the C shim imagefs.mount._fuseshim is out of date (API {api}, "
                      f"not {API}; rebuild it with scripts/setup)")
    return _fuseshim, ""


_fuseshim, _unusable = _load()


@contextlib.contextmanager
def _no_ldconfig() -> Iterator[None]:
    """While trio is imported (import_trio), ctypes.util.find_library("pthread") answers
    from the C library already loaded instead of running `ldconfig -p`: trio asks only to
    name its threads, and the fork and exec cost every mount process ~25 ms at start.
    Since glibc 2.34 the pthread functions are libc's own."""
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return "libc.so.6" if name == "pthread" else real(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = real


@contextlib.contextmanager
def _own_version_only() -> Iterator[None]:
    """While pyfuse3 is imported, importlib.metadata is a stand-in that answers
    version() from the package's own dist-info beside it: pyfuse3 asks for its version
    when imported, and the real importlib.metadata (the email package, zipfile, ...)
    costs a mount process 12 ms at start, on a servicing transaction's critical path.
    Any question the stand-in cannot answer is "not found", as the real one would say;
    the shim then finds an unknown version and turns the fast paths off (never wrong)."""
    if "importlib.metadata" in sys.modules:
        yield
        return

    class PackageNotFoundError(ModuleNotFoundError):
        pass

    def version(name: str) -> str:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise PackageNotFoundError(name)
        site = os.path.dirname(os.path.dirname(spec.origin))
        for info in sorted(glob.glob(os.path.join(site, f"{name}-*.dist-info"))):
            with contextlib.suppress(OSError), open(os.path.join(info, "METADATA")) as fh:
                for line in fh:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
        raise PackageNotFoundError(name)

    stand_in = types.ModuleType("importlib.metadata")
    stand_in.PackageNotFoundError = PackageNotFoundError  # type: ignore[attr-defined]
    stand_in.version = version  # type: ignore[attr-defined]
    with _standing_in(stand_in):
        yield


@contextlib.contextmanager
def _standing_in(module: types.ModuleType) -> Iterator[None]:
    """module is sys.modules[its name] for the block (the caller saw it was not imported)."""
    sys.modules[module.__name__] = module
    try:
        yield
    finally:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


@contextlib.contextmanager
def _trio_only_if_imported() -> Iterator[None]:
    """While pyfuse3 is imported, `trio` is plain_loop's stand-in unless trio is imported
    already: pyfuse3 imports it, at ~50 ms, and a servicing transaction's mount runs
    without it (plain_loop.py).  Each loop points pyfuse3 at the trio it runs with."""
    if "trio" in sys.modules:
        yield
        return
    from .plain_loop import STAND_IN

    with _standing_in(STAND_IN):
        yield


with _own_version_only(), _trio_only_if_imported():
    import pyfuse3  # noqa: E402  (after the shim: see _load)


def import_trio() -> None:
    """Import trio (under _no_ldconfig, if it is not imported yet) and make it pyfuse3's:
    what a mount served by trio does first (trio_loop.py)."""
    if "trio" not in sys.modules:
        with _no_ldconfig():
            import trio  # noqa: F401
    pyfuse3.trio = sys.modules["trio"]  # type: ignore[attr-defined]


def version_tuple(text: str | None) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "3.5.0"; None if there is none."""
    parts = (text or "").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _shown(known: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in known)


def off_reason(env: Mapping[str, str], shim: Any, unusable: str, pyfuse3_version: str | None,
               libfuse_version: str | None, libfuse_headers: str | None) -> str:
    """Why the fast paths are off, or "" when they are on."""
    if env.get(ENV_OFF):
        return f"{ENV_OFF}={env[ENV_OFF]} is set"
    if shim is None:
        return unusable or "the C shim imagefs.mount._fuseshim is not loaded"
    if version_tuple(pyfuse3_version) not in PYFUSE3_KNOWN:
        return (f"pyfuse3 {pyfuse3_version} is not a version the shim knows "
                f"({_shown(PYFUSE3_KNOWN)}; docs/shim.md)")
    if version_tuple(libfuse_version) not in LIBFUSE_KNOWN:
        return (f"libfuse {libfuse_version} is not a version the shim knows "
                f"({_shown(LIBFUSE_KNOWN)}; docs/shim.md)")
    if version_tuple(libfuse_headers) not in LIBFUSE_KNOWN:
        return (f"the shim was built with the libfuse {libfuse_headers} headers, not a "
                f"version it knows ({_shown(LIBFUSE_KNOWN)}; docs/shim.md)")
    return ""


def versions() -> dict[str, str | None]:
    """What the check looks at: pyfuse3's version, libfuse's (that loaded in this process)
    and that of the headers the shim was built with (None where unknown)."""
    return {
        "pyfuse3": getattr(pyfuse3, "__version__", None),
        "libfuse": _fuseshim.libfuse_version() if _fuseshim is not None else None,
        "libfuse_headers": getattr(_fuseshim, "LIBFUSE_HEADERS", None),
    }


_versions = versions()


def fast_paths_off() -> str:
    """Why this process's mounts run without the fast paths, or "" if they have them.
    The environment is read at each call (a warm fork server's mounts follow it)."""
    v = _versions
    return off_reason(os.environ, _fuseshim, _unusable, v["pyfuse3"], v["libfuse"],
                      v["libfuse_headers"])


def shim() -> Any:
    """The _fuseshim module to configure, or None (not built, or out of date)."""
    return _fuseshim


def unusable() -> str:
    """Why there is no shim to configure (not built, out of date), or "" (scripts/setup)."""
    return _unusable


_said = False


def say_once(label: str) -> None:
    """One log line, the first time a mount of this process starts without fast paths."""
    global _said
    why = fast_paths_off()
    if _said or not why:
        return
    _said = True
    if _fuseshim is None:
        log.warning("%s: %s: %s; pyfuse3's handlers answer every request, lseek reports no "
                    "holes, fallocate fails (EOPNOTSUPP)", label, OFF, why)
    elif os.environ.get(ENV_OFF):
        log.info("%s: %s: %s; pyfuse3's handlers answer every request", label, OFF, why)
    else:
        log.warning("%s: %s: %s; pyfuse3's handlers answer every request", label, OFF, why)


# FUSE opcodes (linux/fuse.h) by name, for the request counts a mount logs when it ends.
OPCODES = {1: "lookup", 2: "forget", 3: "getattr", 4: "setattr", 5: "readlink", 6: "symlink",
           8: "mknod", 9: "mkdir", 10: "unlink", 11: "rmdir", 12: "rename", 13: "link",
           14: "open", 15: "read", 16: "write", 17: "statfs", 18: "release", 20: "fsync",
           21: "setxattr", 22: "getxattr", 23: "listxattr", 24: "removexattr", 25: "flush",
           26: "init", 27: "opendir", 28: "readdir", 29: "releasedir", 30: "fsyncdir",
           32: "setlk", 34: "access", 35: "create", 36: "interrupt", 37: "bmap",
           38: "destroy", 39: "ioctl", 40: "poll", 42: "batch_forget", 43: "fallocate",
           44: "readdirplus", 45: "rename2", 46: "lseek", 47: "copy_file_range"}


def request_summary() -> str:
    """The requests this process served, most first ("4181: 807 flush, ..."), and those of
    them that went to pyfuse3's coroutines rather than the fast paths, from the shim's
    counters; "not counted" without the shim."""
    if _fuseshim is None or not hasattr(_fuseshim, "request_counts"):
        return "not counted"
    summary = _counted(_fuseshim.request_counts())
    slow = _fuseshim.coroutine_counts() if hasattr(_fuseshim, "coroutine_counts") else {}
    return f"{summary}; through pyfuse3's coroutines {_counted(slow)}"


def _counted(counts: dict[int, int]) -> str:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    total = sum(n for _op, n in ranked)
    return f"{total}: " + ", ".join(f"{n} {OPCODES.get(op, f'opcode {op}')}"
                                    for op, n in ranked)
