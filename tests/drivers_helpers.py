"""What the driver tests share: the kernel and driver fixtures, an image of bookworm-minbase
with Debian's cloud kernel in it (made once per test process), the README's coverage
tables, kmod's tools as oracles, crafted kernel modules, and the SIGKILL loop.

The image: bookworm-minbase with the kernel package's files (extracted with `dpkg-deb
--fsys-tarfile | tar -x --keep-directory-symlink`: plain `dpkg-deb -x` would replace
minbase's lib -> usr/lib symlink with a directory) and what the host's `depmod -b ROOT
KVER` writes, as the package's postinst would (the package ships no modules.dep),
captured at zstd level 1 as index 1 "kernel".  Shared: copy it before changing it
(image_copy)."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cli_zygote
import pytest
from conftest import (
    REPO,
    fixture_tree,
    run_imagefs,
    servicing_leftovers,
    settled_after_a_kill,
    wait_until,
)

from imagefs.session.mounts import cleanup
from imagefs.verify import verify
from servicing.transaction import cleanup_workspaces

FIXTURES = Path(os.environ.get("IMAGEFS_FIXTURES", REPO.parent / "shared/fixtures"))
DRIVERS = FIXTURES / "drivers"
REPOSITORY = DRIVERS / "repository"
HARDWARE = DRIVERS / "hardware"
WRONG = DRIVERS / "wrong-kernel" / "ifs_demo_nic.ko"
KERNEL_DEB = FIXTURES / "kernel" / "linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"
KVER = "6.1.0-57-cloud-amd64"
INVENTORIES = ("nuc-13-pro", "latitude-5540", "qemu-vm")
VERMAGIC = f"{KVER} SMP preempt mod_unload modversions "
UPDATES = f"/lib/modules/{KVER}/updates/imagefs"

NEEDS_KERNEL = pytest.mark.skipif(
    not KERNEL_DEB.is_file() or not REPOSITORY.is_dir() or os.geteuid() != 0
    or shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") is None
    or shutil.which("bwrap") is None,
    reason="needs root, bwrap, kmod (modprobe) and the kernel and driver fixtures")
SBIN = {"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def kernel_files() -> Path:
    """The kernel package's files with depmod's output, in a merged-/usr root (lib ->
    usr/lib), extracted once into ~/.cache/imagefs/trees/ (as scripts/fixture-tree keeps
    the fixture trees) and kept there."""
    cache = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagefs"
             / "trees" / KERNEL_DEB.stem)
    if cache.is_dir():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{KERNEL_DEB.stem}-", dir=cache.parent))
    (tmp / "usr/lib").mkdir(parents=True)
    (tmp / "lib").symlink_to("usr/lib")
    subprocess.run(f"dpkg-deb --fsys-tarfile {KERNEL_DEB} | "
                   f"tar -x --keep-directory-symlink -C {tmp}", shell=True, check=True)
    subprocess.run(["depmod", "-b", str(tmp), KVER], check=True, env=SBIN)
    try:
        tmp.rename(cache)
    except OSError:  # another test process was first
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def kernel_tree(dest: Path) -> Path:
    """bookworm-minbase with the cloud kernel installed in it, at dest: hard links to the
    read-only fixture trees (nothing writes into their files: the kernel's are new paths,
    every directory is dest's own)."""
    subprocess.run(["cp", "-al", str(fixture_tree("bookworm-minbase")), str(dest)],
                   check=True)
    files = kernel_files()
    subprocess.run(["cp", "-al", str(files / "boot"), str(files / "usr"), f"{dest}/"],
                   check=True)
    return dest


@functools.cache
def kernel_image() -> Path:
    """The shared image (index 1 "kernel"); removed when the test process ends."""
    place = Path(tempfile.mkdtemp(prefix="imagefs-drivers-"))
    atexit.register(shutil.rmtree, place, True)
    tree = kernel_tree(place / "tree")
    image = place / "kernel.imagefs"
    run_imagefs("capture", tree, image, "--name", "kernel", "--level", "1")
    return image


def image_copy(where: Path) -> Path:
    copy = where / "work.imagefs"
    shutil.copyfile(kernel_image(), copy)
    return copy


def readme_tables() -> dict[str, list[tuple[str, list[str], list[str]]]]:
    """The coverage tables of the drivers README: inventory -> [(modalias, modules with
    the kernel alone, modules with the repository)], "-" as []."""
    lines = (DRIVERS / "README.md").read_text().splitlines()
    out: dict[str, list[tuple[str, list[str], list[str]]]] = {}
    for name in INVENTORIES:
        heading = next(n for n, ln in enumerate(lines)
                       if ln.startswith(f"`hardware/{name}.json` ("))
        rows = []
        for line in lines[heading + 1:]:
            if line.startswith("| `") and ":" in line:
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows.append((cells[0].strip("`"), _names(cells[2]), _names(cells[3])))
            elif rows and not line.startswith("|"):
                break
        out[name] = rows
    return out


def _names(cell: str) -> list[str]:
    if cell.startswith("-"):
        return []
    return [n.strip() for n in cell.split(",")]


def modprobe_resolve(root: Path | str, modalias: str) -> list[str]:
    """`modprobe -d ROOT -S KVER -R MODALIAS`, each module once ([] when none)."""
    out = subprocess.run(["modprobe", "-d", str(root), "-S", KVER, "-R", modalias],
                         capture_output=True, text=True, env=SBIN)
    assert out.returncode in (0, 1), out.stderr
    return list(dict.fromkeys(out.stdout.split()))


def kmod(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, env=SBIN)
    assert out.returncode == 0, out.stderr
    return out.stdout


def craft_module(name: str, vermagic: str = VERMAGIC, *, aliases: tuple[str, ...] = (),
                 depends: tuple[str, ...] = (), firmware: tuple[str, ...] = (),
                 versions: dict[str, int] | None = None, machine: int = 62) -> bytes:
    """A minimal kernel module: an ELF64 relocatable object with .modinfo (and __versions)
    sections, as modpost writes them; enough for modinfo and depmod to read."""
    info = [f"name={name}", f"vermagic={vermagic}", "license=GPL", "version=0.1",
            *(f"alias={a}" for a in aliases), *(f"firmware={f}" for f in firmware),
            f"depends={','.join(depends)}"]
    sections = [(".modinfo", b"\0".join(i.encode() for i in info) + b"\0")]
    if versions:
        sections.append(("__versions", b"".join(
            struct.pack("<Q", crc) + sym.encode().ljust(56, b"\0")
            for sym, crc in versions.items())))
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + b".shstrtab\0"
    body, headers, at = b"", [b"\0" * 64], 64
    name_at = 1
    for sname, data in [*sections, (".shstrtab", names)]:
        headers.append(struct.pack("<IIQQQQIIQQ", name_at, 1 if sname != ".shstrtab" else 3,
                                   0, 0, at + len(body), len(data), 0, 0, 1, 0))
        name_at += len(sname) + 1
        body += data
    shoff = 64 + len(body)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, shoff, 0, 64, 0, 0,
                                 64, len(headers), len(headers) - 1)
    return header + body + b"".join(headers)


def cleaned_up() -> None:
    """What `imagefs cleanup --all` does, in this process (as the transaction tests)."""
    cleanup(None)
    cleanup_workspaces()


def kill_at_random(image: Path, argv: list[str], state: Callable[[Path], str], rounds: int,
                   seed: int, pristine: Path, done: Path | None = None) -> dict[str, int]:
    """SIGKILL `imagefs ARGV` at moments spread over its run time, `rounds` times; after
    the cleanup the image verifies, state(image) is "old" or "new" (it fails on anything
    in between), and nothing of the verb is left.  The image starts each round as
    pristine (also the first, whole run that measures the run time: its result is kept
    as done)."""
    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    args = [*map(str, argv), "--no-daemon"]
    shutil.copyfile(pristine, image)
    start = time.monotonic()
    done_run = cli_zygote.run(args)
    assert done_run.returncode == 0, done_run.stderr.decode(errors="replace")
    whole = time.monotonic() - start
    if done is not None:
        shutil.copyfile(image, done)
    for _ in range(rounds):
        shutil.copyfile(pristine, image)
        proc = cli_zygote.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        settled_after_a_kill()
        cleaned_up()
        # A container killed with its verb can take a moment to be gone (its processes
        # end when their reads of the dead mount fail).
        assert wait_until(lambda: servicing_leftovers() == [], 15), servicing_leftovers()
        assert verify(str(image)).ok
        seen[state(image)] += 1
    return seen


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The refusal a verb printed: exactly one line, starting with `imagefs: `."""
    err = proc.stderr.decode()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("imagefs: "), err
    return lines[0]


PLAN_LINE = re.compile(r"^  (add|replace|keep) module (\S+) ")
