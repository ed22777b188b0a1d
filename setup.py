"""Build the one C helper (imagefs/mount/_fuseshim.c: what pyfuse3 lacks, and fast paths).

Everything else is in pyproject.toml.  The extension is optional for pip: without a
compiler or the libfuse3 headers the install still succeeds and mounts work without
SEEK_HOLE, fallocate and the fast paths.  scripts/setup is not so lenient: it fails,
naming what is missing, when the shim does not import after the install (docs/shim.md)."""

import shlex
import subprocess

from setuptools import Extension, setup


def fuse3_cflags() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"]
    return shlex.split(out)


setup(ext_modules=[Extension("imagefs.mount._fuseshim", ["imagefs/mount/_fuseshim.c"],
                             extra_compile_args=fuse3_cflags() + ["-O2", "-Wall"],
                             optional=True)])
