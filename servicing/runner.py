"""Run a program of a Debian root inside a container rooted at it (issue 14).

Servicing runs the image's own dpkg, apt and maintainer scripts, never the host's, so
that what they do is what the image's Debian would do.  They run under bubblewrap
(`bwrap`, the sandbox flatpak is built on), which starts in ~15 ms where systemd-nspawn
takes ~120 ms (a servicing transaction starts one container or more): private mount, pid,
network (only `lo`), uts and ipc namespaces, the root bound on /, a fresh /proc, a minimal
/dev (null, zero, full, random, urandom, tty, a private devpts), tmpfs on /run and /tmp.
The host's /etc (dpkg.cfg.d, apt.conf.d, resolv.conf), logs and /sys are simply not
visible inside: an offline image must not decide anything from the host's hardware.

The programs run as root (dpkg chowns to the image's own uids) but with a bounding set
of capabilities that keeps only what package scripts use (CAPABILITIES): none mounts,
loads modules, sets the clock, makes device nodes or opens raw I/O, so a hostile
maintainer script cannot reach the host's disks through the container.

Everything bwrap mounts lives in its mount namespace, which dies with the run: nothing
stays mounted on the host, also when the run is killed (by our timeout, or the caller's
death: `--die-with-parent` kills the whole sandbox, and the pid namespace's end kills
every process of it).

Services must not start during servicing: a `usr/sbin/policy-rc.d` exiting 101 is put in
the root for the run; one already there is moved aside and renamed back afterwards (the
same inode: byte for byte, owner, mode and times).  A caller killed with SIGKILL cannot
clean up: the next run recognises a stale one by its marker comment and restores the
saved one first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from imagefs.errors import Busy, SystemFailure, UsageError
from imagefs.mount.cpu import on_cpu, pinned_cpu
from imagefs.mount.registry import record_for

BWRAP = "bwrap"
POLICY_RC_D = "policy-rc.d"  # in usr/sbin
SAVED_POLICY = ".policy-rc.d.imagefs-saved"  # an existing one, moved aside for the run
POLICY_SCRIPT = (b"#!/bin/sh\n"
                 b"# imagefs servicing: no service starts in an offline image; this file is\n"
                 b"# removed after the run (a stale one is recognised by this comment)\n"
                 b"exit 101\n")
# Written by the wrapper in the container to stderr just before the command runs: what
# comes before it on stderr is bwrap's own, after it the command's.
STARTED = b"\x1eimagefs-started\n"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
KILL_WAIT = 10.0  # seconds to wait for a killed run's processes to be gone
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# What package scripts need as root: own and chmod files of any uid (dpkg, adduser,
# chown in postinst), switch users (su, runuser, start-stop-daemon --chuid), set file
# capabilities (setcap in iputils-ping's postinst), signal their own processes, chroot
# (inside the container's root only: it is pivoted, the host's is not reachable).
# Not kept: sys_admin (mounts), sys_module, sys_time, sys_rawio, mknod, net_admin, ...
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
                "CAP_FSETID", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETFCAP",
                "CAP_KILL", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE", "CAP_NET_BIND_SERVICE")
# Mount points the container needs in the root: real directories (never symlinks, which
# would point bwrap's mounts elsewhere), or the root is refused.
MOUNT_POINTS = ("dev", "proc", "run", "tmp")


@dataclass(frozen=True)
class Completed:
    """What a command in the container did: its exit code and its output."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


def dpkg_options() -> list[str]:
    """dpkg's options for servicing: keep changed conffiles without asking."""
    return ["--force-confdef", "--force-confold"]


def service_env() -> dict[str, str]:
    """The environment of every command in the container: nothing asks a question."""
    return {
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
        "APT_LISTCHANGES_FRONTEND": "none",
        "APT_LISTBUGS_FRONTEND": "none",
        "LC_ALL": "C.UTF-8",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }


def run(root: str | os.PathLike[str], argv: Sequence[str], *,
        env: Mapping[str, str] | None = None, input: bytes | None = None,
        timeout: float | None = None, binds: Sequence[tuple[str, str]] = ()) -> Completed:
    """Run argv in a container rooted at root and return what it did.

    env adds to (or overrides) service_env(); input is its stdin (none: /dev/null);
    binds are (host path, container path) pairs bound read-only, for inputs such as a
    directory of .debs; the container path is under /run/, the container's own tmpfs,
    where bwrap creates the mount point, never in the root.  A run longer than timeout
    seconds is killed with everything it started and raises SystemFailure.  One run at a
    time per root (Busy otherwise)."""
    root = os.path.abspath(os.fspath(root))
    argv = list(argv)
    _check(root, argv, env or {}, binds)
    bwrap = shutil.which(BWRAP, path=HOST_PATH)
    if bwrap is None:
        raise SystemFailure(BWRAP, "not found; install the Debian package bubblewrap")
    cmd = [*bwrap_argv(bwrap, root, {**service_env(), **(env or {})}, binds),
           "/bin/sh", "-c", "printf '\\036imagefs-started\\n' >&2; exec \"$@\"", "sh", *argv]
    with _locked(root), _policy_rc_d(root), on_cpu(_served_on(root)):
        out, err, code = _communicate(root, argv, cmd, input, timeout)
    mine, started, theirs = err.partition(STARTED)
    if not started:
        first = mine.decode(errors="replace").strip().splitlines() or [f"exit code {code}"]
        raise SystemFailure(BWRAP, f"cannot start the container at {root}: {first[0]}")
    return Completed(argv, code, out, mine + theirs)


def _served_on(root: str) -> int | None:
    """The CPU a servicing transaction's mount of root runs on (imagefs.mount.cpu): the
    container runs there too, so that each of its requests to the mount is a context
    switch rather than two wakeups of another CPU.  None for any other root."""
    rec = record_for(root)
    return pinned_cpu(rec.pid) if rec is not None and rec.pid > 0 else None


def bwrap_argv(bwrap: str, root: str, env: Mapping[str, str],
               binds: Sequence[tuple[str, str]]) -> list[str]:
    """bubblewrap's argv up to the command; each option says why in a comment."""
    caps = [arg for cap in CAPABILITIES for arg in ("--cap-add", cap)]
    return [
        bwrap,
        "--die-with-parent",  # our death (SIGKILL too) ends the whole sandbox
        "--new-session",  # no controlling terminal to push input into
        "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-ipc",
        "--unshare-cgroup-try",  # only lo; a private hostname; no host processes
        "--hostname", f"imagefs-{secrets.token_hex(4)}",
        "--bind", root, "/",  # the root, writable: what dpkg writes lands in it
        "--dev", "/dev", "--proc", "/proc",  # minimal /dev, fresh /proc
        "--tmpfs", "/run", "--tmpfs", "/tmp",  # scratch that leaves no trace in the root
        *(arg for src, dst in binds for arg in ("--ro-bind", src, dst)),
        "--clearenv", *(arg for k, v in env.items() for arg in ("--setenv", k, v)),
        "--chdir", "/",
        "--cap-drop", "ALL", *caps,
        "--",
    ]


def _check(root: str, argv: list[str], env: Mapping[str, str],
           binds: Sequence[tuple[str, str]]) -> None:
    """Refuse what cannot run, with one line (a UsageError) rather than bwrap's words."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory")
    if not os.path.lexists(os.path.join(root, "usr/bin/env")):
        raise UsageError(f"{root}: not an operating system root (no /usr/bin/env)")
    for name in MOUNT_POINTS:
        path = os.path.join(root, name)
        if os.path.islink(path) or not os.path.isdir(path):
            raise UsageError(f"{root}: /{name} is not a directory; the container mounts "
                             "its own there")
    if not argv or not argv[0]:
        raise UsageError("nothing to run in the container")
    for k, v in env.items():
        if not _ENV_NAME.match(k) or "\n" in v or "\0" in v:
            raise UsageError(f"bad environment variable for the container: {k!r}")
    for src, dst in binds:
        if not os.path.exists(src) or not dst.startswith("/run/") or ".." in dst.split("/"):
            raise UsageError(f"cannot bind {src} to {dst}: needs an existing source and a "
                             "destination under /run/ (a tmpfs: the root is left unchanged)")


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """Hold an exclusive flock on root: two runs would fight over policy-rc.d and dpkg's
    lock."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(root, "a servicing run is using this root") from None
        yield
    finally:
        os.close(fd)


def _sbin_fd(root: str) -> int:
    """A descriptor of root's usr/sbin, opened without following symlinks: an image is
    anybody's, and a symlinked usr/sbin must not make us write on the host."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in ("usr", "sbin"):
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise UsageError(f"{root}: usr/sbin is not a directory") from None
                raise SystemFailure(root, f"cannot open usr/sbin: {e.strerror}") from None
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_ours(name: str, dir_fd: int) -> bool | None:
    """True if name is a policy-rc.d we wrote, False if something else, None if absent."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != len(POLICY_SCRIPT):
        return False
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return os.read(fd, len(POLICY_SCRIPT) + 1) == POLICY_SCRIPT
    finally:
        os.close(fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def _policy_rc_d(root: str) -> Iterator[None]:
    """usr/sbin/policy-rc.d exits 101 during the run; root's own is back afterwards."""
    fd = _sbin_fd(root)
    try:
        try:
            _recover(root, fd)
            sbin = os.fstat(fd)  # its times are put back: the run leaves no trace
            saved = _exists(POLICY_RC_D, fd)
            if saved:
                os.rename(POLICY_RC_D, SAVED_POLICY, src_dir_fd=fd, dst_dir_fd=fd)
            new = os.open(POLICY_RC_D, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                          0o755, dir_fd=fd)
            try:
                os.write(new, POLICY_SCRIPT)
                os.fchmod(new, 0o755)
            finally:
                os.close(new)
        except OSError as e:
            raise SystemFailure(root, f"cannot install usr/sbin/policy-rc.d: {e}") from None
        try:
            yield
        finally:
            try:
                if _is_ours(POLICY_RC_D, fd):
                    os.unlink(POLICY_RC_D, dir_fd=fd)
                if saved:
                    os.rename(SAVED_POLICY, POLICY_RC_D, src_dir_fd=fd, dst_dir_fd=fd)
                os.utime(fd, ns=(sbin.st_atime_ns, sbin.st_mtime_ns))
            except OSError as e:
                raise SystemFailure(root, f"cannot restore usr/sbin/policy-rc.d: {e}") from None
    finally:
        os.close(fd)


def _recover(root: str, fd: int) -> None:
    """Undo what a killed run left: our policy-rc.d goes, a saved one comes back."""
    ours = _is_ours(POLICY_RC_D, fd)
    if _exists(SAVED_POLICY, fd):
        if ours is False:
            raise UsageError(f"{root}: both usr/sbin/policy-rc.d and {SAVED_POLICY} (left by a "
                             "killed servicing run) exist; keep one and remove the other")
        os.rename(SAVED_POLICY, POLICY_RC_D, src_dir_fd=fd, dst_dir_fd=fd)
    elif ours:
        os.unlink(POLICY_RC_D, dir_fd=fd)


def _communicate(root: str, argv: list[str], cmd: list[str], input: bytes | None,
                 timeout: float | None) -> tuple[bytes, bytes, int]:
    """Run cmd; on timeout (or any exception, ^C included) kill it all and wait for it."""
    host_env = {"PATH": HOST_PATH}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if input is None else
                                subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=host_env, cwd="/", start_new_session=True)
    except OSError as e:
        raise SystemFailure(cmd[0], f"cannot run: {e.strerror}") from None
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise SystemFailure(root, f"{argv[0]} ran longer than {timeout:g} s; killed with "
                            "everything it started") from None
    except BaseException:
        _kill(proc)
        raise
    return out, err, proc.returncode


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the namespaces' init (bwrap's child) so that the kernel kills every process
    of the run; bwrap reaps it and exits, and then nothing of the run is left, mounts
    included.  Its process group is killed too, for a run killed before bwrap forked."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_WAIT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=KILL_WAIT)
