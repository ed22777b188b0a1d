"""The C shim beneath pyfuse3 (imagefs/mount/_fuseshim.c, shim.py, docs/shim.md): which
versions it knows and that this machine has them (so the default run exercises the fast
paths), the fallback without fast paths (unknown versions, IMAGEFS_NO_FAST_PATHS, no
shim built) and its one log line, and (-m slow) the shim built with AddressSanitizer and
UBSan under the exactness and writable-model tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, is_mounted, mounted, run_imagefs, unmount_hard
from test_no_fast_paths import EXACTNESS_AND_MODEL, mount_logs, run_tests_in_subprocess

import imagefs.mount
from imagefs.mount import shim
from imagefs.mount.fuse import BaseOperations

KNOWN = {"pyfuse3": "3.5.0", "libfuse": "3.14.0", "libfuse_headers": "3.14"}


def reason(env: dict[str, str] | None = None, module: object = object(), unusable: str = "",
           **versions: str | None) -> str:
    v: dict[str, str | None] = {**KNOWN, **versions}
    return shim.off_reason(env or {}, module, unusable, v["pyfuse3"], v["libfuse"],
                           v["libfuse_headers"])


def test_known_versions_give_fast_paths() -> None:
    assert reason() == ""
    assert reason(pyfuse3="3.5.9", libfuse="3.14.1") == ""


def test_pyfuse3_learns_its_version_without_importlib_metadata() -> None:
    """shim._own_version_only: a fresh process that imports the shim (as a mount process
    does) gets pyfuse3's true version, the fast paths on, and no importlib.metadata; one
    that has importlib.metadata already keeps it."""
    probe = ("import sys, imagefs.mount.shim as s, pyfuse3; "
             "print(pyfuse3.__version__, 'importlib.metadata' in sys.modules, "
             "repr(s.fast_paths_off()))")
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout.split()
    import importlib.metadata

    assert fresh == [importlib.metadata.version("pyfuse3"), "False", "''"]
    already = subprocess.run([sys.executable, "-c", "import importlib.metadata; " + probe],
                             capture_output=True, text=True, check=True, cwd=REPO)
    assert already.stdout.split() == [fresh[0], "True", "''"]


@pytest.mark.parametrize(("change", "expected"), [
    ({"env": {"IMAGEFS_NO_FAST_PATHS": "1"}}, "IMAGEFS_NO_FAST_PATHS=1 is set"),
    ({"module": None, "unusable": "the C shim imagefs.mount._fuseshim is not built (x)"},
     "is not built"),
    ({"module": None}, "not loaded"),
    ({"pyfuse3": "3.6.0"}, "pyfuse3 3.6.0 is not a version the shim knows (3.5.x"),
    ({"pyfuse3": "3.4.1"}, "pyfuse3 3.4.1 is not"),
    ({"pyfuse3": "unknown"}, "pyfuse3 unknown is not"),
    ({"pyfuse3": None}, "pyfuse3 None is not"),
    ({"libfuse": "3.17.2"}, "libfuse 3.17.2 is not a version the shim knows (3.14.x"),
    ({"libfuse": None}, "libfuse None is not"),
    ({"libfuse_headers": "3.16"}, "built with the libfuse 3.16 headers"),
])
def test_unknown_versions_turn_the_fast_paths_off(change: dict, expected: str) -> None:
    assert expected in reason(**change)


def test_this_machine_has_the_shim_and_known_versions(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """scripts/setup builds the shim; the pins (pyproject.toml) and shim.py agree with what
    is installed, so the default test run serves through the fast paths."""
    monkeypatch.delenv(shim.ENV_OFF, raising=False)
    assert shim.unusable() == ""
    assert shim.shim() is not None and shim.shim().API == shim.API
    assert shim.fast_paths_off() == "", shim.versions()
    (a, b), = shim.PYFUSE3_KNOWN
    pin = re.search(r'"pyfuse3([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None and pin.group(1) == f">={a}.{b},<{a}.{b + 1}"
    doc = (REPO / "docs" / "shim.md").read_text()
    for name, known in (("pyfuse3", shim.PYFUSE3_KNOWN), ("libfuse", shim.LIBFUSE_KNOWN)):
        for major, minor in known:
            assert f"{name} {major}.{minor}" in doc, (name, major, minor)


def test_fast_handlers_follow_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = BaseOperations("test")
    monkeypatch.delenv(shim.ENV_OFF, raising=False)
    assert ops.fast_handlers() == {}  # on (BaseOperations has no fast functions)
    monkeypatch.setenv(shim.ENV_OFF, "1")
    assert ops.fast_handlers() is None
    monkeypatch.delenv(shim.ENV_OFF)
    monkeypatch.setattr(shim, "_versions", {**KNOWN, "pyfuse3": "3.6.0"})
    assert ops.fast_handlers() is None


def test_the_log_says_it_once(monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shim, "_said", False)
    monkeypatch.delenv(shim.ENV_OFF, raising=False)
    with caplog.at_level(logging.INFO, logger="imagefs.mount"):
        shim.say_once("first")  # on: nothing to say
        assert caplog.records == []
        monkeypatch.setattr(shim, "_versions", {**KNOWN, "libfuse": "3.18.0"})
        shim.say_once("first")
        shim.say_once("second")
    assert [r.getMessage() for r in caplog.records] == [
        "first: fast paths off: libfuse 3.18.0 is not a version the shim knows (3.14.x; "
        "docs/shim.md); pyfuse3's handlers answer every request"]
    assert caplog.records[0].levelno == logging.WARNING


def test_a_stale_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    stale = types.ModuleType("imagefs.mount._fuseshim")
    monkeypatch.delattr(imagefs.mount, "_fuseshim", raising=False)
    monkeypatch.setitem(sys.modules, "imagefs.mount._fuseshim", stale)
    module, why = shim._load()
    assert module is None
    assert f"out of date (API 1, not {shim.API}" in why


def small_image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello\n" * 1000)
    os.symlink("d/f", src / "link")
    os.setxattr(src / "d" / "f", "user.k", b"v")
    image = tmp_path / "s.imagefs"
    run_imagefs("capture", src, image, "--name", "small")
    return image


def test_mounts_here_run_the_fast_paths(tmp_path: Path) -> None:
    """The default run's mounts use the fast paths: their logs have no "fast paths off"."""
    if os.environ.get(shim.ENV_OFF):
        pytest.skip(f"{shim.ENV_OFF} is set for this run")
    image = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt) as rec:
        assert (mnt / "link").read_bytes() == b"hello\n" * 1000
        text = Path(rec["log"]).read_text()
    assert shim.OFF not in text, text


def coroutine_requests(log: str) -> dict[str, int]:
    """The requests a mount's last log line says went through pyfuse3's coroutines."""
    m = re.search(r"through pyfuse3's coroutines \d+: (.*)", log)
    assert m, log
    return {name: int(n) for n, name in re.findall(r"(\d+) ([a-z_0-9 ]+?)(?:,|$)", m.group(1))}


def test_a_writable_mount_answers_its_changes_on_the_fast_paths(tmp_path: Path) -> None:
    """create, mkdir, mknod, symlink, link, rename, setattr (chmod, chown, utimes,
    truncate), unlink, rmdir and statfs never reach a pyfuse3 coroutine; what the session
    holds afterwards is what was done."""
    if os.environ.get(shim.ENV_OFF):
        pytest.skip(f"{shim.ENV_OFF} is set for this run")
    image = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt, "--rw", "--no-daemon") as rec:
        d = mnt / "work"
        d.mkdir(mode=0o750)
        (d / "f").write_bytes(b"x" * 5000)
        os.mkfifo(d / "fifo")
        os.symlink("f", d / "sym")
        os.link(d / "f", d / "hard")
        os.rename(d / "hard", d / "moved")
        os.chmod(d / "f", 0o600)
        os.chown(d / "f", 1234, 5678)
        os.truncate(d / "f", 100)
        os.utime(d / "f", ns=(1_000_000_000, 2_000_000_000))
        os.statvfs(mnt)
        st = os.stat(d / "moved")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                st.st_mtime_ns) == (0o600, 1234, 5678, 100, 2, 2_000_000_000)
        assert os.readlink(d / "sym") == "f"
        os.unlink(d / "moved")
        os.unlink(d / "sym")
        (d / "sub").mkdir()
        os.rmdir(d / "sub")
        assert sorted(os.listdir(d)) == ["f", "fifo"]
    slow = coroutine_requests(Path(rec["log"]).read_text())
    changes = {"setattr", "create", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir",
               "rename", "rename2", "statfs"}
    assert not changes & set(slow), slow


def test_without_the_shim_a_mount_falls_back_and_says_so_once(tmp_path: Path) -> None:
    """The shim not built (its import fails): the mount serves through pyfuse3 alone and
    its log says so in one line."""
    image = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    no_shim = ("import runpy, sys\n"
               "sys.modules['imagefs.mount._fuseshim'] = None  # as if not built\n"
               "sys.argv[0] = 'imagefs'\n"
               "runpy.run_module('imagefs.cli', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", no_shim, "mount", str(image), "small",
                           str(mnt), "--json"], capture_output=True, timeout=60)
    pid = None
    try:
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        rec = json.loads(proc.stdout)
        pid = rec["pid"]
        assert (mnt / "link").read_bytes() == b"hello\n" * 1000
        assert os.getxattr(mnt / "d" / "f", "user.k") == b"v"
        text = Path(rec["log"]).read_text()
        lines = [ln for ln in text.splitlines() if shim.OFF in ln]
        assert len(lines) == 1, text
        assert "the C shim imagefs.mount._fuseshim is not built" in lines[0]
        assert "lseek reports no holes" in lines[0]
        assert "lseek shim" not in text and "not beneath pyfuse3" not in text
    finally:
        if pid is not None or is_mounted(mnt):
            unmount_hard(mnt, pid)


# --- the shim under AddressSanitizer and UBSan (-m slow) ---------------------------------

def _libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                         text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def build_sanitized_shim(pkg: Path) -> None:
    """Copy the packages to pkg/ and build the shim there with ASan and UBSan."""
    for name in ("imagefs", "daemon", "servicing"):
        shutil.copytree(REPO / name, pkg / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    cflags = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True,
                            text=True).stdout.split() or ["-I/usr/include/fuse3"]
    out = pkg / "imagefs" / "mount" / ("_fuseshim" + sysconfig.get_config_var("EXT_SUFFIX"))
    build = subprocess.run(
        ["gcc", "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-Wall",
         "-Werror", *cflags, "-I" + sysconfig.get_paths()["include"],
         str(pkg / "imagefs" / "mount" / "_fuseshim.c"), "-o", str(out)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr


@pytest.mark.slow
def test_the_shim_under_sanitizers(tmp_path: Path) -> None:
    """The exactness and writable-model tests against the shim built with
    -fsanitize=address,undefined: no report, no crash.  Python is not built with ASan, so
    libasan is preloaded (into every process of the run; harmless for the others), leaks
    are not reported (CPython keeps memory until exit by design), and any UBSan finding
    aborts the process that made it (the mount, whose test then fails)."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("gcc with libasan is needed")
    pkg = tmp_path / "pkg"
    build_sanitized_shim(pkg)
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {
        "PYTHONPATH": str(pkg),  # the copy, with the sanitized shim, before the editable
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={reports}/asan",
        "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={reports}/ubsan",
    }
    # The copy is what mounts import, its shim current and its fast paths on.
    check = subprocess.run(
        [sys.executable, "-c", "from imagefs.mount import shim; m = shim.shim(); "
         "print(m.__file__ if m else shim.unusable()); print(shim.fast_paths_off())"],
        cwd=pkg, capture_output=True, text=True,
        env={k: v for k, v in {**os.environ, **env}.items() if k != shim.ENV_OFF})
    assert check.returncode == 0, check.stderr
    where, off = (check.stdout.splitlines() + ["", ""])[:2]
    assert where.startswith(str(pkg)), check.stdout
    assert off == "", off
    try:
        run_tests_in_subprocess(EXACTNESS_AND_MODEL, tmp_path, env, cwd=pkg, timeout=3600,
                                drop=(shim.ENV_OFF,))
    finally:
        found = {p.name: p.read_text(errors="replace") for p in reports.iterdir()}
        assert not found, "sanitizer reports:\n" + "\n".join(
            f"--- {n}\n{t[:6000]}" for n, t in found.items())
    logs = mount_logs(tmp_path)
    assert len(logs) >= 3, sorted(logs)
    for path, text in logs.items():
        assert shim.OFF not in text, f"{path}:\n{text[-2000:]}"
        assert "Traceback" not in text, f"{path}:\n{text[-3000:]}"


def test_a_mount_process_starts_without_ldconfig() -> None:
    """trio asks ctypes.util.find_library for libpthread at import, which runs ldconfig -p
    (a fork and exec in every mount process's start); shim.py answers from libc when a
    mount served by trio imports it (trio_loop.py; pyfuse3 itself was imported with
    plain_loop's stand-in)."""
    code = ("import ctypes.util\n"
            "def refuse(name):\n"
            "    raise SystemExit('ldconfig asked for ' + name)\n"
            "ctypes.util._findSoname_ldconfig = refuse\n"
            "import sys, imagefs.mount.fuse\n"
            "assert 'trio' not in sys.modules\n"
            "import imagefs.mount.trio_loop, pyfuse3, trio._core._thread_cache as c\n"
            "assert pyfuse3.trio is sys.modules['trio']\n"
            "assert c.set_os_thread_name is not None  # threads still named\n"
            "import ctypes.util as u\n"
            "assert u.find_library.__module__ == 'ctypes.util'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr


def all_requests(log: str) -> dict[str, int]:
    """Every request a mount's last log line counts, by name."""
    m = re.search(r"; requests \d+: (.*?)(?:; through|$)", log, re.M)
    assert m, log
    return {name: int(n) for n, name in re.findall(r"(\d+) ([a-z_0-9 ]+?)(?:,|$)", m.group(1))}


def test_a_writable_mount_lists_from_the_kernels_cache_until_a_change(tmp_path: Path
                                                                      ) -> None:
    """Listing an unchanged directory again costs no READDIRPLUS (the kernel keeps it);
    after each kind of change in it, a listing shows the change."""
    if os.environ.get(shim.ENV_OFF):
        pytest.skip(f"{shim.ENV_OFF} is set for this run")
    image = small_image(tmp_path)
    mnt = tmp_path / "mnt"
    with mounted(image, 1, mnt, "--rw", "--no-daemon") as rec:
        d, other = mnt / "d", mnt / "other"
        other.mkdir()
        (other / "o").write_bytes(b"o")
        for _ in range(20):
            assert sorted(os.listdir(d)) == ["f"]
            assert sorted(os.listdir(other)) == ["o"]
        # each change, then what d and other list
        changes: list[tuple[Callable[[], object], list[str], list[str]]] = [
            (lambda: (d / "new").write_bytes(b"n"), ["f", "new"], ["o"]),
            (lambda: os.mkdir(d / "sub"), ["f", "new", "sub"], ["o"]),
            (lambda: os.symlink("f", d / "sym"), ["f", "new", "sub", "sym"], ["o"]),
            (lambda: os.link(d / "f", d / "hard"), ["f", "hard", "new", "sub", "sym"], ["o"]),
            (lambda: os.rename(d / "new", d / "renamed"),
             ["f", "hard", "renamed", "sub", "sym"], ["o"]),
            (lambda: os.rename(other / "o", d / "in"),
             ["f", "hard", "in", "renamed", "sub", "sym"], []),
            (lambda: os.rename(d / "in", other / "out"),
             ["f", "hard", "renamed", "sub", "sym"], ["out"]),
            (lambda: os.unlink(d / "hard"), ["f", "renamed", "sub", "sym"], ["out"]),
            (lambda: os.rmdir(d / "sub"), ["f", "renamed", "sym"], ["out"]),
            (lambda: os.rename(d / "renamed", d / "f"), ["f", "sym"], ["out"]),  # replaces f
            (lambda: os.mkfifo(d / "fifo"), ["f", "fifo", "sym"], ["out"]),
        ]
        for change, in_d, in_other in changes:
            change()
            for _ in range(3):
                assert sorted(os.listdir(d)) == in_d
                assert sorted(os.listdir(other)) == in_other
    counts = all_requests(Path(rec["log"]).read_text())
    # without the cache: 2 a listing, 188 in all; with it, the first listing of each
    # directory and of d after each change (and of other after its 3 changes), ~2 each
    listings = counts.get("readdirplus", 0) + counts.get("readdir", 0)
    assert listings <= 2 * (2 + len(changes) + 3) + 4, counts
