"""Start the imagefs CLI for the tests without paying Python's start-up each time.

Most of what a test spends on `python -m imagefs.cli ARGS` is the interpreter starting
and importing the standard library and the third-party modules imagefs uses (zstandard,
xxhash, pyfastcdc, pathlib, dataclasses, ...): 0.2-0.4 s of CPU per command, and the
suite runs thousands of commands.  A zygote is one `python` process, started like the CLI
would be (same executable, same environment), that has imported those modules (PRELOAD)
and nothing of imagefs, daemon or servicing; for each command it forks a child that
becomes what `python -m imagefs.cli ARGS` would be at that point:

- the caller's argv (as `-m` sets it), environment (os.environ and the C environ), cwd,
  umask, stdin/stdout/stderr (passed over the socket), and an optional RLIMIT_AS;
- every other file descriptor closed (subprocess's close_fds);
- a fresh `__main__`; `runpy._run_module_as_main("imagefs.cli")`, as `-m` does, so every
  imagefs module is imported anew in the child, with the child's own environment;
- the interpreter then ends as any other: SystemExit's code, a traceback and exit 1 for
  an exception, atexit handlers, flushing stdout and stderr.

The process is a real one: its pid can be signalled (CliProcess signals through a pidfd),
killed at any moment, its exit code or signal is reported as subprocess reports it.  What
differs from a fresh process, and why it does not matter here:

- variables read when a process starts (PYTHON*, LD_*, MALLOC_*, GLIBC_*, LANG, LC_*)
  cannot change in a child: they pick the zygote, one per distinct set (MAX_ZYGOTES; a
  command beyond them runs as a fresh process);
- the hash seed is the zygote's, the same for every command;
- RLIMIT_AS is set after the preloaded modules are mapped (a fresh process maps them
  under the limit: the same pages, counted all the same);
- /proc/PID/cmdline of the command itself shows the zygote's argv (mount processes and
  guardians set their own titles, as they do outside the tests: setproctitle is set up in
  the zygote before any child changes its environment);
- verbs that start mount processes (MOUNTING_VERBS) get a zygote with trio imported too,
  as the daemon's fork server has it; never pyfuse3, which must come after imagefs's C
  shim (tests/test_cli_zygote.py checks that the fast paths are on in such mounts).

Commands asked for by another process than the one that started the zygotes (a test's
forked child, often under another uid) run as fresh processes, and so does every command
when IMAGEFS_TEST_FRESH_CLI=1 (tests/test_cli_zygote.py compares both ways).  Tests that
measure a command's own memory or start-up, the daemon, and a few kept on purpose
(test_errors, test_lazy, the foreground mount, one kill-and-cleanup test) start fresh
processes.  The zygotes end with the test session (`shutdown`), or when the process that
started them ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

FRESH_ENV = "IMAGEFS_TEST_FRESH_CLI"
MAX_ZYGOTES = 6
# Read by the interpreter or the C library when a process starts; a zygote serves only
# commands whose values of these are its own.
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "LC_")
STARTUP_NAMES = ("LANG", "LANGUAGE")
# Imported by the zygote: standard library and third-party modules only (imagefs, daemon
# and servicing are imported by each command itself).  A module missing here costs time,
# never correctness.
PRELOAD = (
    "argparse", "array", "base64", "bisect", "collections", "concurrent.futures",
    "contextlib", "ctypes", "dataclasses", "datetime", "enum", "errno", "fcntl", "fnmatch",
    "functools", "glob", "hashlib", "heapq", "importlib", "importlib.metadata", "inspect",
    "io", "itertools", "json", "logging", "math", "mmap", "pathlib", "platform", "pwd", "grp",
    "queue", "random", "re", "resource", "selectors", "shlex", "shutil", "signal", "socket",
    "sqlite3", "stat", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "traceback", "types", "typing", "urllib.parse", "uuid", "weakref",
    "zlib",
    "zstandard", "xxhash", "pyfastcdc", "pyfastcdc.cy", "psutil", "setproctitle",
    "rich", "rich.console", "rich.progress", "debian", "debian.deb822", "debian.debfile",
    "debian.debian_support", "runpy",
)
# Verbs whose command starts mount processes (forks of itself: imagefs.mount.process.start)
# get a zygote that has trio and pyfuse3 imported too, as the daemon's fork server has them;
# the others do without (a zygote holding them makes every command's exit slower).
MOUNTING_VERBS = frozenset({"mount", "remount", "package", "health", "firstboot", "feature",
                            "driver", "generalize"})
FOR_MOUNTS = ("trio",)

# The zygote itself, run as `python -c ZYGOTE SOCKET PRELOAD`.  It stays single-threaded
# so that fork is safe; a child leaves the serving loop and runs the CLI below it.
ZYGOTE = r'''
import importlib, json, os, selectors, socket, struct, sys
for _name in sys.argv[2].split(","):
    try:
        importlib.import_module(_name)
    except Exception as _e:
        print(f"zygote: {_name} not preloaded: {_e!r}", file=sys.stderr)
_srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
_srv.bind(sys.argv[1])
_srv.listen(64)
# setproctitle finds the memory of argv and environ when it is first used and moves
# environ away; done here, before a child changes its environment, the titles that mount
# processes and guardians give themselves show in /proc/PID/cmdline as without a zygote.
try:
    import setproctitle
    setproctitle.getproctitle()
except ImportError:
    pass
import gc
gc.collect()
gc.freeze()  # the children neither scan nor copy what the zygote imported
_sel = selectors.DefaultSelector()
_sel.register(_srv, selectors.EVENT_READ, "accept")
_parent = os.pidfd_open(os.getppid())
_sel.register(_parent, selectors.EVENT_READ, "parent")
_children = {}  # pidfd -> (pid, conn)
_conns = set()
_job = None
sys.stdout.write("ready\n")
sys.stdout.flush()
while _job is None:
    for _key, _ in _sel.select():
        if _key.data == "parent":
            os._exit(0)
        if _key.data == "accept":
            _c, _ = _srv.accept()
            _pid, _uid, _gid = struct.unpack("3i", _c.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if _uid != os.geteuid():  # only the zygote's own user may ask
                _c.close()
                continue
            _sel.register(_c, selectors.EVENT_READ, "request")
            _conns.add(_c)
        elif _key.data == "request":
            _c = _key.fileobj
            _sel.unregister(_c)
            try:
                _msg, _fds, _, _ = socket.recv_fds(_c, 1 << 20, 3)
            except OSError:
                _msg, _fds = b"", []
            if len(_fds) != 3 or not _msg:
                for _fd in _fds:
                    os.close(_fd)
                _conns.discard(_c)
                _c.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            _pid = os.fork()
            if _pid == 0:
                _job = (json.loads(_msg), _fds, _c)
                break
            for _fd in _fds:
                os.close(_fd)
            _pidfd = os.pidfd_open(_pid)
            socket.send_fds(_c, [json.dumps({"pid": _pid}).encode()], [_pidfd])
            _children[_pidfd] = (_pid, _c)
            _sel.register(_pidfd, selectors.EVENT_READ, "child")
        else:  # a child ended
            _pidfd = _key.fd
            _sel.unregister(_pidfd)
            _pid, _c = _children.pop(_pidfd)
            _, _status, _ru = os.wait4(_pid, 0)
            os.close(_pidfd)
            try:
                _c.send(json.dumps({"code": os.waitstatus_to_exitcode(_status),
                                    "cpu": _ru.ru_utime + _ru.ru_stime}).encode())
            except OSError:
                pass
            _conns.discard(_c)
            _c.close()

# The child: become `python -m imagefs.cli ARGS` as started by the caller.
_req, _fds, _c = _job
_sel.close()
_srv.close()
os.close(_parent)
for _pidfd, (_pid, _other) in _children.items():
    os.close(_pidfd)
for _other in _conns:
    _other.close()
for _i, _fd in enumerate(_fds):
    if _fd != _i:
        os.dup2(_fd, _i)
os.closerange(3, 1 << 16)  # close_fds, as subprocess does (the request's socket too)
os.chdir(_req["cwd"])
os.umask(_req["umask"])
os.environ.clear()
os.environ.update(_req["env"])
import tempfile as _tempfile, time as _time
_time.tzset()
_tempfile.tempdir = None  # found again from this environment's TMPDIR when first asked
if _req.get("rlimit_as") is not None:
    import resource as _resource
    _resource.setrlimit(_resource.RLIMIT_AS, (_req["rlimit_as"], _req["rlimit_as"]))
import runpy as _runpy, types as _types
sys.argv = ["-m", *_req["args"]]
sys.path[0] = os.getcwd()  # what -m puts first
_main = _types.ModuleType("__main__")
_main.__builtins__ = __builtins__
sys.modules["__main__"] = _main
del _req, _fds, _c, _job, _children, _conns, _sel, _srv, _parent
_runpy._run_module_as_main("imagefs.cli")
'''


def _startup_key(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items()
                        if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES))


class _Zygote:
    def __init__(self, env: Mapping[str, str], workdir: str, preload: Sequence[str]) -> None:
        n = len(os.listdir(workdir))
        self.path = os.path.join(workdir, f"z{n}.sock")
        self.log = open(os.path.join(workdir, f"z{n}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, self.path, ",".join(preload)],
            env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self.log, cwd="/")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != b"ready\n":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the CLI zygote did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class _State:
    owner: int | None = None  # the pid that may use the zygotes
    creds: tuple[int, int, tuple[int, ...]] | None = None
    workdir: str | None = None
    zygotes: dict[tuple[bool, tuple[tuple[str, str], ...]], _Zygote] = {}
    lock = threading.Lock()


def _creds() -> tuple[int, int, tuple[int, ...]]:
    return os.geteuid(), os.getegid(), tuple(sorted(os.getgroups()))


def start() -> None:
    """Allow zygotes for the commands of this process (each made on first use)."""
    _State.owner = os.getpid()
    _State.creds = _creds()
    # a short path (sockets' names are limited to 107 bytes), mode 0700
    _State.workdir = tempfile.mkdtemp(prefix="imagefs-zygote-",
                                      dir="/tmp" if os.path.isdir("/tmp") else None)


def shutdown() -> None:
    """Stop the zygotes and remove their directory."""
    with _State.lock:
        for z in _State.zygotes.values():
            z.stop()
        _State.zygotes.clear()
        _State.owner = None
        if _State.workdir is not None:
            shutil.rmtree(_State.workdir, ignore_errors=True)
            _State.workdir = None


def _zygote_for(env: Mapping[str, str], args: Sequence[str]) -> _Zygote | None:
    if (_State.owner != os.getpid() or _State.creds != _creds()
            or os.environ.get(FRESH_ENV) == "1" or env.get(FRESH_ENV) == "1"):
        return None
    mounts = bool(args) and args[0] in MOUNTING_VERBS
    key = (mounts, _startup_key(env))
    with _State.lock:
        z = _State.zygotes.get(key)
        if z is not None:
            if z.proc.poll() is None:
                return z
            z.stop()  # it died: start another
        elif len(_State.zygotes) >= MAX_ZYGOTES:
            return None
        assert _State.workdir is not None
        z = _Zygote(env, _State.workdir, PRELOAD + FOR_MOUNTS if mounts else PRELOAD)
        _State.zygotes[key] = z
        return z


class CliProcess:
    """A command started by a zygote, with the parts of subprocess.Popen the tests use:
    pid, stdin, stdout, stderr (binary pipes, or None), poll, wait, send_signal, kill,
    terminate, communicate, returncode.  Signals go through a pidfd (never to a reused
    pid)."""

    def __init__(self, conn: socket.socket, pid: int, pidfd: int, args: list[str],
                 stdin: IO[bytes] | None, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None) -> None:
        self.args = args
        self.pid = pid
        self._pidfd = pidfd
        self._conn = conn
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self.cpu_seconds: float | None = None

    def _finish(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        self._conn.settimeout(timeout)
        try:
            msg = self._conn.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        finally:
            self._conn.settimeout(None)
        if not msg:
            raise RuntimeError(f"the CLI zygote went away while {self.args} ran")
        doc = json.loads(msg)
        self.cpu_seconds = float(doc["cpu"])  # the command's own CPU time
        self.returncode = int(doc["code"])
        self._conn.close()
        os.close(self._pidfd)
        return self.returncode

    def poll(self) -> int | None:
        return self._finish(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._finish(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: bytes | None = None, timeout: float | None = None
                    ) -> tuple[bytes | None, bytes | None]:
        """As Popen.communicate: write input, read both pipes to their end, wait."""
        out: list[bytes] = []
        err: list[bytes] = []

        def read(pipe: IO[bytes] | None, into: list[bytes]) -> None:
            if pipe is not None:
                into.append(pipe.read())
                pipe.close()

        threads = [threading.Thread(target=read, args=(self.stdout, out), daemon=True),
                   threading.Thread(target=read, args=(self.stderr, err), daemon=True)]
        for t in threads:
            t.start()
        if self.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                if input:
                    self.stdin.write(input)
            with contextlib.suppress(BrokenPipeError):
                self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return (b"".join(out) if self.stdout is not None else None,
                b"".join(err) if self.stderr is not None else None)


Process = CliProcess | subprocess.Popen[bytes]
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


def _child_end(spec: int | None, fd: int, writing: bool
               ) -> tuple[int, IO[bytes] | None, bool]:
    """(the fd the child gets, our end or None, whether to close the child's fd here)."""
    if spec == PIPE:
        r, w = os.pipe()
        if writing:  # the child writes: we read
            return w, os.fdopen(r, "rb"), True
        return r, os.fdopen(w, "wb"), True
    if spec == DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    return fd, None, False


def popen(args: Sequence[str], env: Mapping[str, str] | None = None,
          stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
          rlimit_as: int | None = None) -> Process:
    """`python -m imagefs.cli ARGS`, through a zygote when one may serve this caller, else
    as a fresh process.  stdin/stdout/stderr: PIPE, DEVNULL or None (inherited)."""
    full = dict(os.environ if env is None else env)
    z = _zygote_for(full, args)
    if z is None:
        pre = None
        if rlimit_as is not None:
            limit = rlimit_as

            def pre() -> None:
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        return subprocess.Popen([sys.executable, "-m", "imagefs.cli", *args], env=full,
                                stdin=stdin, stdout=stdout, stderr=stderr, preexec_fn=pre)
    ends = [_child_end(stdin, 0, False), _child_end(stdout, 1, True),
            _child_end(stderr, 2, True)]
    req = {"args": list(args), "env": full, "cwd": os.getcwd(), "rlimit_as": rlimit_as,
           "umask": _umask()}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(z.path)
        socket.send_fds(conn, [json.dumps(req).encode()], [e[0] for e in ends])
    finally:
        for fd, _mine, close in ends:
            if close:
                os.close(fd)
    msg, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not msg or len(fds) != 1:
        conn.close()
        raise RuntimeError(f"the CLI zygote did not start {list(args)}")
    pid = int(json.loads(msg)["pid"])
    return CliProcess(conn, pid, fds[0], list(args), ends[0][1], ends[1][1], ends[2][1])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run(args: Sequence[str], input: bytes | None = None, env: Mapping[str, str] | None = None,
        timeout: float | None = None, stdin: int | None = None,
        rlimit_as: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """As subprocess.run(capture_output=True) of `python -m imagefs.cli ARGS`: on a
    timeout the command is killed and subprocess.TimeoutExpired raised."""
    p = popen(args, env=env, stdin=PIPE if input is not None else stdin, stdout=PIPE,
              stderr=PIPE, rlimit_as=rlimit_as)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    code = p.wait()
    return subprocess.CompletedProcess([sys.executable, "-m", "imagefs.cli", *args], code,
                                       out or b"", err or b"")
