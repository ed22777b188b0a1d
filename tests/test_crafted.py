"""Hostile images with valid checksums, generated: every read verb keeps its promise.

tests/crafted.py writes crafted commit records, metadata blocks, records, chunk-table
segments, slots and headers whose checksums are all valid, so what is tested is the
parsing and the use of what lies behind them.  Hypothesis generates the hostile content:

- commit records: deep nesting, wrong types, short lists (`"tables": [[2597103]]`), lone
  surrogates, huge and negative numbers, repeated table segments, many indices sharing
  one root, other records as roots, raw bytes that are not JSON;
- records: sizes >= 2**63, NUL in xattr names and symlink targets, odd rdev, modes and
  times, weird xattr names, hostile names, hardlinks, cycles, patched bytes;
- extents: the same pack offset with another length and a zero (or another) hash, extents
  into frames that are not packs, overlapping and unsorted extents, with or without chunk
  table entries that match them;
- chunk-table segments, root slots and header fields.

For each image the real CLI runs in a subprocess (address space limited to 1 GiB, 20 s
allowed): info (plain, --json, --history), ls -R and -lR, cat of every known file, extract
/ --dest, apply, verify (plain and --json), diff and export; and, in their own tests, a
read-only mount read through completely, and the daemon's images.* methods.  The promise:

- the exit code is one of 0 1 2 3 4 5 6 7 8 130 (never 70, an internal error, and never
  a signal); a failure is exactly one stderr line starting "imagefs:", never a traceback;
- bounded time and memory;
- nothing is written outside DEST, and the image is left as it was;
- every byte served with exit 0 (cat, extract, apply, a mount's reads) is what the records
  promise and the chunk checksums confirm (crafted.expected_content), and a file whose
  chunks do not check out is never served; `verify` passing means no such file is there;
- --json output is one valid JSON document; an exported image verifies.

The default run takes a small deterministic sample (derandomized, no example database);
`-m slow` runs the long one.  Known hostile cases run as plain parametrized tests too, so
that each distinct failure shows on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cli_zygote
import pytest
from conftest import is_mounted, pid_alive, unmount_hard
from crafted import (
    LIMIT,
    Base,
    Editor,
    Raw,
    Rec,
    add_index,
    append_table_segment,
    deep,
    dir_rec,
    expected_content,
    file_rec,
    ino,
    link_rec,
    list_segment,
    make_base_image,
    read_slot,
    rewrite_commit,
    table_entry,
    write_header,
    write_slot,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_hostile import MEMORY_LIMIT, digest_file

from imagefs.format import layout as F
from imagefs.format.records import check_name

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 7, 8, 130}
TIME_LIMIT = 20.0  # seconds a verb may take on a small hostile image
MAX_CATS = 8

FAST = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate), print_blob=False,
                suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False,
                suppress_health_check=list(HealthCheck))


# ---- running the CLI ---------------------------------------------------------------------


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    stdout: bytes
    stderr: str
    seconds: float
    timed_out: bool = False
    truncated: bool = False  # stdout was cut at LIMIT bytes (the pipe closed on it)

    def __str__(self) -> str:
        return (f"imagefs {' '.join(self.args)} -> {self.code} in {self.seconds:.1f}s"
                f"{' (TIMED OUT)' if self.timed_out else ''}\n{self.stderr[-3000:]}")


def _env() -> dict[str, str]:
    """The test session's run and state dirs and its no-daemon socket; no test hooks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IMAGEFS_") or k in ("IMAGEFS_RUN_DIR", "IMAGEFS_STATE_DIR",
                                                     "IMAGEFS_SOCKET")}
    env["MALLOC_ARENA_MAX"] = "2"  # so that the address-space limit counts real allocations
    return env


def run_verb(*args: object, timeout: float = TIME_LIMIT + 10, limit: int = 64 << 20,
             memory: bool = True) -> Run:
    """The CLI in a child process; stdout is read up to `limit` bytes (then its pipe is
    closed: imagefs exits 0 when its reader goes away), stderr up to 1 MiB."""
    sargs = tuple(a if isinstance(a, str) else os.fsdecode(a) if isinstance(a, bytes)
                  else str(a) for a in args)
    start = time.monotonic()
    p = cli_zygote.popen(sargs, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env(),
                         rlimit_as=MEMORY_LIMIT if memory else None)
    out: list[bytes] = []
    err: list[bytes] = []
    cut = [False]

    def read_out() -> None:
        assert p.stdout is not None
        n = 0
        while chunk := p.stdout.read1(1 << 16):
            out.append(chunk)
            n += len(chunk)
            if n > limit:
                cut[0] = True
                break
        p.stdout.close()

    def read_err() -> None:
        assert p.stderr is not None
        n = 0
        while chunk := p.stderr.read1(1 << 16):
            if n < 1 << 20:
                err.append(chunk)
            n += len(chunk)

    threads = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        p.kill()
        p.wait()
    for t in threads:
        t.join()
    return Run(sargs, p.returncode, b"".join(out), b"".join(err).decode(errors="replace"),
               time.monotonic() - start, timed_out, cut[0])


def promise(r: Run) -> list[str]:
    """What is wrong with how a verb ended, if anything."""
    bad = []
    if r.timed_out or r.seconds > TIME_LIMIT:
        bad.append(f"took {r.seconds:.1f}s (limit {TIME_LIMIT}s)")
    if r.code not in DOCUMENTED:
        bad.append(f"exit code {r.code} is not a documented one"
                   + (" (internal error)" if r.code == 70 else
                      " (killed by a signal)" if r.code < 0 else ""))
    if "Traceback" in r.stderr:
        bad.append("a traceback on stderr")
    if r.code != 0 and not r.timed_out:
        lines = r.stderr.rstrip("\n").split("\n")
        if len(lines) != 1 or not lines[0].startswith("imagefs: "):
            bad.append(f"a failure must be one stderr line starting 'imagefs: ', got "
                       f"{len(lines)} line(s)")
    return bad


Finding = tuple[str, str, "Run | None"]  # (what is wrong, which verb, its run)


def grouped(found: list[Finding]) -> list[str]:
    """Findings, those with the same problem and the same stderr told once, with the verbs
    they concern and one command line."""
    groups: dict[tuple[str, str], list[tuple[str, Run | None]]] = {}
    for problem, verb, r in found:
        tail = "".join(c if c == "\n" or c >= " " else repr(c)[1:-1]
                       for c in r.stderr.strip()[-600:]) if r is not None else ""
        groups.setdefault((problem, tail), []).append((verb, r))
    out = []
    for (problem, tail), members in groups.items():
        line = f"- {problem} [{', '.join(v for v, _r in members if v)}]"
        r = members[0][1]
        if r is not None:
            line += (f"\n    e.g. imagefs {' '.join(r.args)} -> {r.code} in {r.seconds:.1f}s"
                     f"{' (timed out)' if r.timed_out else ''}")
            if tail:
                line += "\n    " + tail.replace("\n", "\n    ")
        out.append(line)
    return out


# ---- what a scenario promises ------------------------------------------------------------


@dataclass
class Expect:
    """index: the INDEX to read; other: the one to diff it with; files: path -> the bytes
    a reader may serve (the first LIMIT), or None: it must refuse the file.  reachable:
    the files' paths are surely those of the index (then a passing verify means no file
    there is None)."""

    index: str = "2"
    other: str = "1"
    files: dict[str, bytes | None] = field(default_factory=dict)
    reachable: bool = False
    note: str = ""  # what was crafted, for the failure message
    probes: list[str] = field(default_factory=list)  # more paths to cat and ls -l (any end)


def base_expect(base: Base, note: str = "") -> Expect:
    return Expect("2", "1", dict(base.files), False, note)


Verb = Callable[[Path, Path, Expect], list[object]]
VERBS: dict[str, Verb] = {
    "info": lambda img, w, e: ["info", img],
    "info-json": lambda img, w, e: ["info", img, "--json"],
    "info-history": lambda img, w, e: ["info", img, "--history"],
    "info-history-json": lambda img, w, e: ["info", img, e.index, "--history", "--json"],
    "info-space-json": lambda img, w, e: ["info", img, "--space", "--json"],
    "ls-R": lambda img, w, e: ["ls", img, e.index, "/", "-R"],
    "ls-lR": lambda img, w, e: ["ls", img, e.index, "/", "-lR"],
    "extract": lambda img, w, e: ["extract", img, e.index, "/", "--dest", w / "extract"],
    "apply": lambda img, w, e: ["apply", img, e.index, w / "apply"],
    "verify": lambda img, w, e: ["verify", img],
    "verify-json": lambda img, w, e: ["verify", img, "--json"],
    "diff": lambda img, w, e: ["diff", img, e.other, e.index],
    "export": lambda img, w, e: ["export", img, e.index, w / "export.ifs", "--level", "1",
                                 "--no-daemon"],
    # packs moved as stored (no --level): their chunks are checked all the same
    "export-moved": lambda img, w, e: ["export", img, e.index, w / "export-moved.ifs",
                                       "--no-daemon"],
    # the compact profile: content ordered by kind, its heads read first
    "export-compact": lambda img, w, e: ["export", img, e.index, w / "export-compact.ifs",
                                         "--compact", "--level", "1", "--no-daemon"],
    # in place: on a copy, so that the other verbs read the image as crafted
    "optimize": lambda img, w, e: ["optimize", shutil.copyfile(img, w / "optimize.ifs")],
}
JSON_VERBS = ("info-json", "info-history-json", "info-space-json", "verify-json")
ALLOWED_IN_WORK = {"image.ifs", "outside", "extract", "apply", "export.ifs",
                   "export-moved.ifs", "export-compact.ifs", "optimize.ifs", "mnt"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _read_prefix(path: bytes) -> bytes | None:
    """The first LIMIT bytes of a regular file (never through a symlink), None if it is
    not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        out = bytearray()
        while len(out) < LIMIT and (b := os.read(fd, min(1 << 20, LIMIT - len(out)))):
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def check_dest(dest: Path, expect: Expect, verb: str) -> list[str]:
    """After a verb wrote DEST and exited 0: the known files there hold what was promised."""
    bad = []
    for path, want in expect.files.items():
        got = _read_prefix(os.fsencode(dest) + os.fsencode(path))
        if got is None:
            continue
        if want is None:
            bad.append(f"{verb} exited 0 and wrote {path} whose chunks do not check out "
                       f"({len(got)} bytes)")
        elif got != want:
            bad.append(f"{verb} exited 0 but wrote other bytes for {path} "
                       f"({len(got)} bytes, sha256 {_sha(got)[:16]}; promised {len(want)}, "
                       f"{_sha(want)[:16]})")
    return bad


def check_verbs(img: Path, work: Path, expect: Expect,
                verbs: tuple[str, ...] = tuple(VERBS), cats: bool = True) -> list[str]:
    """Run the verbs (in parallel) and say everything that breaks a promise."""
    outside = work / "outside"
    outside.mkdir(exist_ok=True)
    before = digest_file(img)
    jobs: list[tuple[str, list[object]]] = [(v, VERBS[v](img, work, expect)) for v in verbs]
    if cats:
        for path in list(expect.files)[:MAX_CATS]:
            jobs.append((f"cat {path}", ["cat", img, expect.index, path]))
        for path in expect.probes[:MAX_CATS]:
            jobs.append((f"probe cat {path}", ["cat", img, expect.index, path]))
            jobs.append((f"probe ls {path}", ["ls", img, expect.index, path, "-l"]))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda j: run_verb(
            *j[1], limit=LIMIT if "cat " in j[0] else 64 << 20), jobs))
    found: list[Finding] = []
    by_verb = {}
    for (verb, _args), r in zip(jobs, results, strict=True):
        by_verb[verb] = r
        found += [(p, verb, r) for p in promise(r)]
        if verb == "verify-json" and r.code == 1 and not r.truncated:
            try:
                json.loads(r.stdout.decode("utf-8"))
            except ValueError as e:
                found.append((f"verify --json printed no valid JSON report ({e})", verb, r))
        if r.code != 0:
            continue
        if verb in JSON_VERBS and not r.truncated:
            try:
                json.loads(r.stdout.decode("utf-8"))
            except ValueError as e:
                found.append((f"--json output is not one valid JSON document ({e})", verb, r))
        if verb.startswith("cat "):
            want = expect.files[verb[4:]]
            got = r.stdout[:LIMIT]
            if want is None:
                found.append((f"cat served {len(got)} bytes of a file whose chunks do not "
                              "check out", verb, r))
            elif got != want:
                found.append((f"cat served other bytes ({len(got)} bytes, sha256 "
                              f"{_sha(got)[:16]}; promised {len(want)}, {_sha(want)[:16]})",
                              verb, r))
        elif verb in ("extract", "apply"):
            found += [(p, verb, r) for p in check_dest(work / verb, expect, verb)]
        elif verb.startswith("export") and (work / f"{verb}.ifs").exists():
            rv = run_verb("verify", work / f"{verb}.ifs")
            if rv.code != 0:
                found.append(("export exited 0 but its image does not verify", verb, rv))
        elif verb == "optimize":
            rv = run_verb("verify", work / "optimize.ifs")
            if rv.code != 0:
                found.append(("optimize exited 0 but the image does not verify", verb, rv))
    v = by_verb.get("verify")
    if v is not None and v.code == 0 and expect.reachable:
        refused = [p for p, want in expect.files.items() if want is None]
        if refused:
            found.append((f"verify passed an index whose files {refused} do not check out",
                          "verify", v))
    if digest_file(img) != before:
        found.append(("a read verb changed the image file", "", None))
    left = set(os.listdir(work)) - ALLOWED_IN_WORK
    if left:
        found.append((f"written outside the destinations: {sorted(left)}", "", None))
    if os.listdir(outside):
        found.append((f"written outside DEST: {os.listdir(outside)}", "", None))
    return grouped(found)


def report(bad: list[str], expect: Expect) -> None:
    if bad:
        pytest.fail(f"crafted: {expect.note}\n" + "\n".join(bad), pytrace=False)


# ---- the mount ---------------------------------------------------------------------------

WALKER = r"""
import hashlib, json, os, stat, sys
root = os.fsencode(sys.argv[1]); limit = int(sys.argv[2])
out = []
def visit(p):
    d = {"p": os.fsdecode(p[len(root):] or b"/")}
    out.append(d)
    try:
        st = os.lstat(p)
    except OSError as e:
        d["err"] = e.errno
        return None
    d["mode"] = st.st_mode
    d["size"] = st.st_size
    try:
        names = os.listxattr(p, follow_symlinks=False)
        for n in names[:20]:
            os.getxattr(p, n, follow_symlinks=False)
    except OSError as e:
        d["xerr"] = e.errno
    if stat.S_ISLNK(st.st_mode):
        try:
            os.readlink(p)
        except OSError as e:
            d["err"] = e.errno
    elif stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                h = hashlib.sha256()
                n = 0
                while n < limit:
                    b = os.read(fd, min(1 << 20, limit - n))
                    if not b:
                        break
                    h.update(b)
                    n += len(b)
                d["sha"] = h.hexdigest()
                d["n"] = n
            finally:
                os.close(fd)
        except OSError as e:
            d["err"] = e.errno
    return st
stack = [root]
while stack and len(out) < 5000:
    p = stack.pop()
    st = visit(p)
    if st is not None and stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(p))
        except OSError as e:
            out[-1]["lerr"] = e.errno
            continue
        stack.extend(p.rstrip(b"/") + b"/" + n for n in reversed(names))
json.dump(out, sys.stdout)
"""


@contextlib.contextmanager
def mount_ro(img: Path, index: str, mnt: Path) -> Iterator[tuple[Run, dict | None]]:
    """imagefs mount (read-only, not through a daemon); yields (run, record or None);
    always unmounted afterwards."""
    mnt.mkdir(exist_ok=True)
    r = run_verb("mount", img, index, mnt, "--json", "--no-daemon", timeout=60,
                 memory=False)
    rec = None
    if r.code == 0:
        with contextlib.suppress(ValueError):
            rec = json.loads(r.stdout)
    try:
        yield r, rec
    finally:
        if r.code == 0 or is_mounted(mnt):
            unmount_hard(mnt, (rec or {}).get("pid"))


def check_mount(img: Path, work: Path, expect: Expect) -> list[str]:
    mnt = work / "mnt"
    bad: list[str] = []
    with mount_ro(img, expect.index, mnt) as (r, rec):
        bad += grouped([(p, "mount", r) for p in promise(r)])
        if r.code != 0:
            return bad
        if rec is None:
            return [f"mount --json printed no record: {r}"]
        try:
            p = subprocess.run([sys.executable, "-c", WALKER, str(mnt), str(LIMIT)],
                               capture_output=True, timeout=TIME_LIMIT + 10)
        except subprocess.TimeoutExpired:
            return [f"reading the mount took longer than {TIME_LIMIT + 10}s"]
        if p.returncode != 0:
            return [f"the walker failed: {p.stderr.decode(errors='replace')[-2000:]}"]
        seen = {d["p"]: d for d in json.loads(p.stdout)}
        for path, want in expect.files.items():
            d = seen.get(path)
            if d is None or "sha" not in d:
                continue
            if want is None:
                bad.append(f"the mount served {d['n']} bytes of {path} whose chunks do not "
                           "check out")
            elif d["sha"] != _sha(want) or d["n"] != len(want):
                bad.append(f"the mount served other bytes for {path} ({d['n']} bytes, "
                           f"sha256 {d['sha'][:16]}; promised {len(want)}, "
                           f"{_sha(want)[:16]})")
        if not pid_alive(rec["pid"]) or not is_mounted(mnt):
            bad.append("the mount process died or the mount went away while being read")
        log = Path(rec["log"]).read_text(errors="replace") if rec.get("log") else ""
        for word in ("unexpected error", "Traceback"):
            if word in log:
                bad.append(f"the mount log shows an internal error:\n{log[-3000:]}")
                break
    return bad


# ---- fixtures and the scenario frame -----------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return make_base_image(tmp_path_factory.mktemp("crafted-base"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crafted-examples")


@contextlib.contextmanager
def example_dir(scratch: Path) -> Iterator[Path]:
    """A work directory for one example (hypothesis runs many in one test)."""
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        yield work
    finally:
        if not is_mounted(work / "mnt"):
            shutil.rmtree(work, ignore_errors=True)


def new_image(base: Base, work: Path) -> Path:
    return base.copy(work / "image.ifs")


# ---- strategies: commit records ----------------------------------------------------------

EDGE_INTS = [-1, -(2 ** 63), 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 62, 2 ** 62 + 1,
             2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30]
SURROGATES = ["\ud800", "a\udcff", "\udfff\ud800x", "\udc80"]
SHORT_LISTS: list[Any] = [[[2597103]], [[4096]], [[]], [[1, 2, 3]], [1], [], ["a"], [[None, None]],
                          [[-1, 5]], [[2 ** 70, 1]], {}, {"a": 1}, [{}], [[4096, 1, 1]]]

json_leaf = st.one_of(
    st.sampled_from(EDGE_INTS), st.integers(),
    st.sampled_from([True, False, None, 1.5, -0.0, 1e308]),
    st.sampled_from([Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"),
                     Raw("1" + "0" * 5000)]),
    st.sampled_from([*SURROGATES, "\x00", "line\nbreak", "x" * 65537, "", "0", "12"]),
    st.text(max_size=12),
    st.sampled_from(SHORT_LISTS),
    st.builds(deep, st.sampled_from([2, 100, 900, 990, 1000, 3000, 100_000]),
              st.sampled_from(["list", "dict"])),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)

TOP_KEYS = ["format", "generation", "created", "tables", "chunks", "unique_bytes",
            "stored_bytes", "indices", "extra"]
INDEX_KEYS = ["name", "description", "created", "modified", "files", "dirs", "bytes", "root",
              "digest", "history", "extra"]
HISTORY_KEYS = ["when", "uid", "user", "action", "result", "source", "level", "extra"]
json_path = st.one_of(
    st.tuples(st.sampled_from(TOP_KEYS)),
    st.tuples(st.just("tables"), st.integers(0, 2)),
    st.tuples(st.just("tables"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("indices"), st.integers(0, 1)),
    st.tuples(st.just("indices"), st.integers(0, 1), st.sampled_from(INDEX_KEYS)),
    st.tuples(st.just("indices"), st.integers(0, 1), st.just("history"), st.integers(0, 1)),
    st.tuples(st.just("indices"), st.integers(0, 1), st.just("history"), st.just(0),
              st.sampled_from(HISTORY_KEYS)),
)
commit_op = st.one_of(
    st.tuples(st.just("set"), json_path, json_value),
    st.tuples(st.just("del"), json_path),
    st.tuples(st.just("root"), st.integers(0, 1), st.integers(0, 10_000)),  # a real ref
    st.tuples(st.just("repeat_tables"), st.sampled_from([2, 17, 1000, 20_000]),
              st.booleans()),  # the segment: the image's first, or one of 2000 entries
    st.tuples(st.just("many_indices"), st.sampled_from([2, 50, 1000, 50_000]),
              st.booleans()),  # the root: index 2's, or a directory of 300 files
    st.tuples(st.just("swap_roots")),
)
commit_recipe = st.one_of(
    st.fixed_dictionaries({"ops": st.lists(commit_op, min_size=1, max_size=4),
                           "fix_generation": st.booleans()}),
    st.fixed_dictionaries({"doc": json_value}),
    st.fixed_dictionaries({"raw": st.one_of(
        st.sampled_from([b"", b"{", b"\xff\xfe", b"\xef\xbb\xbf{}", b"null", b"[]",
                         b'{"format":1}', b"{" * 100_000, b"[" * 100_000]),
        st.binary(max_size=40))}),
)


BIG_SEGMENT = 2000  # entries of the segment a crafted commit may list many times
BIG_DIR = 300  # files in the directory many crafted indices may share as their root


def big_segment(ed: Editor, base: Base) -> int:
    """A chunk-table segment of BIG_SEGMENT entries (the image's chunks over and over)."""
    return ed.append_table([table_entry(c.xxh, c.sha, c.pack, c.offset, c.length)
                            for c in (base.chunks * BIG_SEGMENT)[:BIG_SEGMENT]])


def big_root(ed: Editor) -> dict[str, Any]:
    """A directory of BIG_DIR empty files written (not listed); an index entry naming it."""
    info = add_index(ed, dir_rec([(b"f%04d" % i, file_rec(0)) for i in range(BIG_DIR)]),
                     publish=False)
    return {"bytes": 0, "created": "2026-01-01T00:00:00Z", "description": "",
            "digest": info.digest.hex(), "dirs": 1, "files": BIG_DIR, "history": [],
            "modified": "2026-01-01T00:00:00Z", "name": "big", "root": info.root}


def many_indices(doc: Any, n: int, one: dict[str, Any]) -> None:
    doc["indices"] = [{**one, "history": [], "name": f"i{i}"} for i in range(n)]


def _apply_op(doc: Any, op: tuple, base: Base, ed: Editor) -> None:
    kind = op[0]
    if kind in ("set", "del"):
        path, parent = op[1], doc
        for step in path[:-1]:
            try:
                parent = parent[step]
            except (KeyError, IndexError, TypeError):
                return
        last = path[-1]
        if isinstance(parent, dict) or (isinstance(parent, list) and isinstance(last, int)
                                        and last < len(parent)):
            if kind == "set":
                parent[last] = op[2]
            else:
                with contextlib.suppress(KeyError, IndexError, TypeError):
                    del parent[last]
    elif kind == "root":
        if isinstance(doc.get("indices"), list) and op[1] < len(doc["indices"]) and \
                isinstance(doc["indices"][op[1]], dict):
            doc["indices"][op[1]]["root"] = base.refs[op[2] % len(base.refs)]
    elif kind == "repeat_tables":
        if op[2]:
            doc["tables"] = [[big_segment(ed, base), BIG_SEGMENT]] * op[1]
        elif isinstance(doc.get("tables"), list):
            doc["tables"] = doc["tables"][:1] * op[1]
    elif kind == "many_indices":
        idx = doc.get("indices")
        if op[2]:
            many_indices(doc, op[1], big_root(ed))
        elif isinstance(idx, list) and idx and isinstance(idx[-1], dict):
            many_indices(doc, op[1], idx[-1])
    elif kind == "swap_roots":
        idx = doc.get("indices")
        with contextlib.suppress(KeyError, IndexError, TypeError):
            idx[0]["root"], idx[1]["root"] = idx[1]["root"], idx[0]["root"]


def _brief(x: Any, n: int = 300) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def build_commit(base: Base, work: Path, recipe: dict) -> tuple[Path, Expect]:
    img = new_image(base, work)
    with Editor(img) as ed:
        if "raw" in recipe:
            ed.publish(recipe["raw"])
        elif "doc" in recipe:
            ed.publish(recipe["doc"])
        else:
            doc = ed.commit_doc()
            for op in recipe["ops"]:
                _apply_op(doc, op, base, ed)
            ed.publish(doc, fix_generation=recipe["fix_generation"])
    return img, base_expect(base, f"commit record {_brief(recipe)}")


# ---- strategies: records -----------------------------------------------------------------

U64_EDGE = [0, 1, 4095, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
U32_EDGE = [0, 1, 2 ** 31, 2 ** 32 - 1, 65534, 65535]
I64_EDGE = [0, -1, 1, 2 ** 63 - 1, -(2 ** 63), 10 ** 18, -(10 ** 18), 4102444800 * 10 ** 9]
XATTR_NAMES = [b"user.a", b"user.b", b"user.a\x00b", b"\x00", b"trusted.t", b"system.a\nb",
               b"user.\nx", b"security.\x1b[0m",
               b"security.capability", b"security.selinux", b"system.posix_acl_access",
               b"system.posix_acl_default", b"user.", b"user", b"x", b"user." + b"n" * 250,
               b"user.\xff\xfe", b"user.a/b"]
SYMLINK_TARGETS = [b"a\x00b", b"\x00", b"/", b"..", b"../../../../../../../../etc/passwd",
                   b"/etc/passwd", b"x" * 4096, b"x" * 4097, b"@OUTSIDE@", b"@OUTSIDE@/pwned",
                   b"hello.txt", b".", b"//", b"\xff\xfe"]
BAD_NAMES = [b"", b".", b"..", b"a/b", b"a\x00b", b"/", b"x" * 255]

u64 = st.one_of(st.sampled_from(U64_EDGE), st.integers(0, 2 ** 64 - 1))
u32 = st.one_of(st.sampled_from(U32_EDGE), st.integers(0, 2 ** 32 - 1))
i64 = st.one_of(st.sampled_from(I64_EDGE), st.integers(-(2 ** 63), 2 ** 63 - 1))
xattrs = st.lists(st.tuples(st.one_of(st.sampled_from(XATTR_NAMES),
                                      st.binary(min_size=1, max_size=24)),
                            st.one_of(st.binary(max_size=40),
                                      st.sampled_from([b"", b"\x02\x00\x00\x00",
                                                       b"\x02\x00\x00\x00" + b"\xff" * 8]))),
                  max_size=3)
# Names a directory may hold, control characters included (they end up in messages).
ODD_NAMES = [b"new\nline", b"\x1b[31mred", b"cr\rx", b"tab\tx", b"\x85", "\u00e9".encode(),
             b"\xff", b"-rf", b" "]
good_name = st.one_of(st.sampled_from(ODD_NAMES), st.binary(min_size=1, max_size=24).filter(
    lambda n: n not in (b".", b"..") and b"/" not in n and b"\0" not in n))
child_name = st.one_of(good_name, good_name, good_name, st.sampled_from(BAD_NAMES))

leaf_kind = st.sampled_from([F.REG, F.REG, F.LNK, F.CHR, F.BLK, F.FIFO, F.SOCK])


@st.composite
def leaf_recipe(draw: st.DrawFn) -> dict:
    kind = draw(leaf_kind)
    r: dict[str, Any] = {
        "kind": kind,
        "mode": draw(st.one_of(st.just(None), u32, st.integers(0, 0o7777))),
        "uid": draw(st.one_of(st.just(0), u32)), "gid": draw(st.one_of(st.just(0), u32)),
        "mtime": draw(i64), "atime": draw(i64), "ctime": draw(i64),
        "xattrs": draw(xattrs),
        "nlink": draw(st.one_of(st.none(), st.none(), u32)),  # None: as a writer would
        "patch": draw(st.one_of(st.none(), st.none(), st.none(),
                                st.tuples(st.integers(0, 200), st.binary(min_size=1,
                                                                         max_size=8)))),
    }
    if kind == F.REG:
        r["chunks"] = draw(st.lists(st.integers(0, 8), max_size=3))
        r["size"] = draw(st.one_of(st.just("exact"), st.just("exact"), u64,
                                   st.integers(0, 400_000)))
    elif kind == F.LNK:
        r["target"] = draw(st.one_of(st.sampled_from(SYMLINK_TARGETS),
                                     st.binary(min_size=1, max_size=40)))
    elif kind in (F.CHR, F.BLK):
        r["rdev"] = draw(st.one_of(u64, st.sampled_from([os.makedev(1, 3),
                                                          os.makedev(8, 0)])))
    return r


@st.composite
def tree_recipe(draw: st.DrawFn, depth: int = 0) -> dict:
    n = draw(st.integers(1, 4))
    children = []
    for _ in range(n):
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            node: Any = draw(tree_recipe(depth + 1))
        else:
            node = draw(leaf_recipe())
        children.append([draw(child_name), node])
    return {
        "dir": True, "children": children,
        "order": draw(st.sampled_from(["sorted", "sorted", "sorted", "as drawn", "dup"])),
        "hardlink": draw(st.booleans()), "cycle": depth > 0 and draw(st.integers(0, 5)) == 0,
        "sibling_link": draw(st.booleans()),  # a symlink to a file beside it (cat follows)
        "loop": draw(st.sampled_from([None, None, b"zz-loop", b"..", b"/zz-loop", b"zz-loop/x",
                                      b"../" * 50 + b"zz-loop"])),  # a symlink, to there
        "kind_lie": draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 8))),
        "mode": draw(st.one_of(st.none(), u32)), "xattrs": draw(xattrs) if depth else [],
    }


records_recipe = st.fixed_dictionaries({
    "tree": tree_recipe(), "block_size": st.sampled_from([0xFFFF, 0xFFFF, 1, 2])})


def _outside(work: Path) -> bytes:
    return os.fsencode(work / "outside")


def _leaf(r: dict, base: Base, work: Path) -> tuple[Rec, bytes | None, bool]:
    """(record, expected content or None, whether the content is known)."""
    kind = r["kind"]
    i = ino(kind) if kind in (F.REG, F.DIR, F.LNK) else ino(F.REG)
    i.kind = kind
    if kind not in (F.REG, F.DIR, F.LNK):
        i.mode = {F.CHR: stat.S_IFCHR, F.BLK: stat.S_IFBLK, F.FIFO: stat.S_IFIFO,
                  F.SOCK: stat.S_IFSOCK}[kind] | 0o644
    if r["mode"] is not None:
        i.mode = r["mode"] if r["mode"] > 0o7777 else (i.mode & ~0o7777) | r["mode"]
    i.uid, i.gid = r["uid"], r["gid"]
    i.mtime_ns, i.atime_ns, i.ctime_ns = r["mtime"], r["atime"], r["ctime"]
    i.xattrs = list(r["xattrs"])
    rec = Rec(i, patch=r["patch"])
    known = r["patch"] is None
    want: bytes | None = None
    if kind == F.REG:
        pos = 0
        for c in r["chunks"]:
            ch = base.chunks[c % len(base.chunks)]
            i.extents.append((pos, ch.pack, ch.offset, ch.length, ch.xxh))
            pos += ch.length
        i.size = pos if r["size"] == "exact" else r["size"]
        want = expected_content(i.size, i.extents, base.packs)
    elif kind == F.LNK:
        i.target = r["target"].replace(b"@OUTSIDE@", _outside(work))
        i.size = len(i.target)
    elif kind in (F.CHR, F.BLK):
        i.rdev = r["rdev"]
    if r["nlink"] is not None:
        rec.fix = False
        i.nlink = r["nlink"]
        if kind == F.LNK:
            i.size = len(i.target)
    return rec, want, known and kind == F.REG


def build_tree(r: dict, base: Base, work: Path, prefix: bytes, files: dict[str, Any],
               root: Rec | None = None, probes: list[str] | None = None) -> tuple[Rec, bool]:
    """The Rec of a tree recipe; files gets path -> expected content of each regular file
    whose path is unambiguous.  Returns (rec, whether every name is plain and unique)."""
    d = dir_rec([], sort=False)
    if r["mode"] is not None:
        d.ino.mode = r["mode"]
    d.ino.xattrs = list(r["xattrs"])
    top = root or d
    plain = True
    kids: list[Any] = []
    for name, node in r["children"]:
        if node.get("dir"):
            rec, sub_plain = build_tree(node, base, work, prefix + b"/" + name, files, top,
                                        probes)
            plain = plain and sub_plain
            kids.append((name, rec, None, False))
        else:
            rec, want, known = _leaf(node, base, work)
            kids.append((name, rec, want, known))
    if r["hardlink"] and kids and kids[0][1].ino.kind != F.DIR:
        kids.append((kids[0][0][:250] + b".link", kids[0][1], kids[0][2], kids[0][3]))
    follow: list[tuple[bytes, Any]] = []
    if r.get("sibling_link"):
        to = next((k for k in kids if k[1].ino.kind == F.REG and k[3] and check_name(k[0])),
                  None)
        if to is not None:
            kids.append((b"zz-link", link_rec(to[0]), None, False))
            follow.append((b"zz-link", to[2]))
    if r.get("loop"):
        kids.append((b"zz-loop", link_rec(r["loop"]), None, False))
    if r["order"] == "sorted":
        kids.sort(key=lambda k: k[0])
    elif r["order"] == "dup" and len(kids) > 1:
        kids[1] = (kids[0][0], *kids[1][1:])
    names = [k[0] for k in kids]
    if names != sorted(set(names)) or not all(check_name(n) for n in names):
        plain = False
    d.children = [(k[0], k[1]) for k in kids]
    if r.get("kind_lie") is not None and d.children:
        lie = r["kind_lie"]
        if lie != d.children[0][1].ino.kind:
            d.children[0] = (d.children[0][0], d.children[0][1], lie)
    if r["cycle"]:
        d.children.append((b"\xff\xffcycle", top))
    # Paths only through plain names (a path argument cannot hold a NUL, nor name "..").
    if all(check_name(p) for p in prefix.split(b"/")[1:]):
        for name, rec, want, known in kids:
            if known and rec.ino.kind == F.REG and check_name(name):
                files[os.fsdecode(prefix + b"/" + name)] = want
        for name, want in follow:
            if plain:
                files[os.fsdecode(prefix + b"/" + name)] = want
        if probes is not None:
            probes += [os.fsdecode(prefix + b"/" + k[0]) for k in kids
                       if check_name(k[0]) and b"\n" not in k[0]]
    return d, plain


def build_records(base: Base, work: Path, recipe: dict) -> tuple[Path, Expect]:
    img = new_image(base, work)
    files: dict[str, Any] = {}
    probes: list[str] = []
    root, plain = build_tree(recipe["tree"], base, work, b"", files, probes=probes)
    with Editor(img) as ed:
        add_index(ed, root, "crafted", shas=base.shas, block_size=recipe["block_size"])
    if not plain:
        files = {}  # which entry a lookup finds is not defined: contents unchecked
    return img, Expect("3", "2", files, plain, f"records {_brief(recipe, 2000)}",
                       [p for p in probes if p not in files])


# ---- strategies: extents -----------------------------------------------------------------

EXTENT_MUTATIONS = ["ok", "ok", "len-1", "len+1", "len*2", "len=1", "len=max", "len=0",
                    "xxh=0", "xxh=sub", "pack=meta", "pack=table", "pack=commit",
                    "pack+1", "pack=huge", "poff=huge", "poff+1"]
extent_recipe = st.tuples(st.integers(0, 2), st.sampled_from(EXTENT_MUTATIONS),
                          st.sampled_from(["real", "real", "zero", "actual"]))
file_recipe = st.fixed_dictionaries({
    "extents": st.lists(extent_recipe, min_size=1, max_size=3),
    "layout": st.sampled_from(["seq", "seq", "seq", "gap", "overlap", "unsorted", "huge"]),
    "size": st.sampled_from(["exact", "exact", "smaller", "bigger", 2 ** 63, 2 ** 64 - 1]),
})
extents_recipe = st.fixed_dictionaries({
    "files": st.lists(file_recipe, min_size=1, max_size=3),
    "table": st.sampled_from(["none", "matching", "matching-zero-sha"]),
})


def _frame_of(base: Base, kind: bytes) -> int:
    return next(off for off, k, _n in base.frames if k == kind)


def _mutate_extent(base: Base, r: tuple) -> tuple[int, int, int, bytes, bytes]:
    """(pack, offset in pack, length, xxh3, sha) of an extent recipe."""
    import xxhash
    idx, mut, xxh_kind = r
    big = sorted(base.chunks, key=lambda c: -c.length)
    c = big[idx % len(big)]
    pack, poff, length = c.pack, c.offset, c.length
    if mut == "len-1":
        length -= 1
    elif mut == "len+1":
        length += 1
    elif mut == "len*2":
        length *= 2
    elif mut == "len=1":
        length = 1
    elif mut == "len=max":
        length = 2 ** 32 - 1
    elif mut == "len=0":
        length = 0
    elif mut == "pack=meta":
        pack = _frame_of(base, F.KIND_META)
    elif mut == "pack=table":
        pack = _frame_of(base, F.KIND_TABLE)
    elif mut == "pack=commit":
        pack = _frame_of(base, F.KIND_COMMIT)
    elif mut == "pack+1":
        pack += 1
    elif mut == "pack=huge":
        pack = 2 ** 63
    elif mut == "poff=huge":
        poff = 2 ** 32 - 1
    elif mut == "poff+1":
        poff += 1
    if xxh_kind == "zero" or mut == "xxh=0":
        xxh = bytes(16)
    elif xxh_kind == "actual" or mut == "xxh=sub":
        raw = base.packs.get(pack, b"")
        xxh = xxhash.xxh3_128_digest(raw[poff:poff + length])
    else:
        xxh = c.xxh
    return pack, poff, length, xxh, c.sha


def build_extents(base: Base, work: Path, recipe: dict) -> tuple[Path, Expect]:
    img = new_image(base, work)
    files: dict[str, bytes | None] = {}
    kids = []
    entries = []
    shas = dict(base.shas)
    for n, fr in enumerate(recipe["files"]):
        extents = []
        pos = total = 0
        for k, er in enumerate(fr["extents"]):
            pack, poff, length, xxh, sha = _mutate_extent(base, er)
            layout = fr["layout"]
            foff = {"seq": pos, "gap": pos + 4096 * (k + 1), "overlap": max(pos - 100, 0),
                    "unsorted": pos if k == 0 else 0, "huge": 2 ** 63 + total}[layout]
            extents.append((foff, pack, poff, length, xxh))
            pos = foff + length
            total += length
            entries.append(table_entry(xxh, bytes(32) if recipe["table"] ==
                                       "matching-zero-sha" else sha, pack, poff,
                                       length & 0xFFFFFFFF))
            shas.setdefault((pack, poff), sha)
        size = {"exact": pos, "smaller": max(pos - 1, 0), "bigger": pos + 70_000}.get(
            fr["size"], fr["size"])
        size = min(size, 2 ** 64 - 1) if isinstance(size, int) else pos
        rec = file_rec(size)
        rec.ino.extents = [(a, b, c, d & 0xFFFFFFFF, e) for a, b, c, d, e in extents]
        name = f"f{n}"
        kids.append((name.encode(), rec))
        files[f"/{name}"] = expected_content(size, rec.ino.extents, base.packs)
    # The genuine file first: its chunk is read (and cached) before the crafted ones.
    c = sorted(base.chunks, key=lambda c: -c.length)[0]
    kids.append((b"a-genuine", file_rec(c.length, [(0, c.pack, c.offset, c.length,
                                                    c.xxh)])))
    files["/a-genuine"] = base.packs[c.pack][c.offset:c.offset + c.length]
    with Editor(img) as ed:
        doc = ed.commit_doc()
        if recipe["table"] != "none":
            list_segment(doc, ed.append_table(entries), entries)
        add_index(ed, dir_rec(kids), "crafted", shas=shas, doc=doc)
    return img, Expect("3", "2", files, True, f"extents {_brief(recipe, 2000)}")


# ---- strategies: chunk-table segments ----------------------------------------------------

segment_recipe = st.fixed_dictionaries({
    "entries": st.lists(st.tuples(st.integers(0, 8), st.sampled_from(
        ["same", "xxh=0", "sha=0", "len+1", "len=0", "pack+1", "pack=huge", "poff=huge",
         "random"])), max_size=6),
    "extra_bytes": st.sampled_from([0, 0, 0, 1, 63]),
    "count": st.sampled_from(["right", "right", "+1", "-1", 0, 2 ** 62, "file"]),
    "at": st.sampled_from(["own", "own", "own", "pack", "meta", "commit", "header",
                           "past"]),
})
tables_recipe = st.fixed_dictionaries({
    "segments": st.lists(segment_recipe, min_size=1, max_size=3),
    "listing": st.sampled_from(["append", "replace", "repeat"]),
})


def build_tables(base: Base, work: Path, recipe: dict) -> tuple[Path, Expect]:
    import random
    img = new_image(base, work)
    with Editor(img) as ed:
        doc = ed.commit_doc()
        segs = []
        for s in recipe["segments"]:
            raw = b""
            for idx, mut in s["entries"]:
                c = base.chunks[idx % len(base.chunks)]
                xxh, sha, pack, poff, length = c.xxh, c.sha, c.pack, c.offset, c.length
                if mut == "xxh=0":
                    xxh = bytes(16)
                elif mut == "sha=0":
                    sha = bytes(32)
                elif mut == "len+1":
                    length += 1
                elif mut == "len=0":
                    length = 0
                elif mut == "pack+1":
                    pack += 1
                elif mut == "pack=huge":
                    pack = 2 ** 64 - 1
                elif mut == "poff=huge":
                    poff = 2 ** 32 - 1
                if mut == "random":
                    raw += random.Random(idx).randbytes(F.CHUNK_ENTRY.size)
                else:
                    raw += table_entry(xxh, sha, pack, poff, length)
            raw += bytes(s["extra_bytes"])
            own = ed.append_table(raw)
            at = {"own": own, "pack": _frame_of(base, F.KIND_PACK),
                  "meta": _frame_of(base, F.KIND_META), "commit": _frame_of(base, F.KIND_COMMIT),
                  "header": 0, "past": 2 ** 40}[s["at"]]
            n = len(raw) // F.CHUNK_ENTRY.size
            count = {"right": n, "+1": n + 1, "-1": max(n - 1, 0),
                     "file": os.path.getsize(img)}.get(s["count"], s["count"])
            segs.append([at, count])
        if recipe["listing"] == "append":
            doc["tables"] = [*doc["tables"], *segs]
        elif recipe["listing"] == "replace":
            doc["tables"] = segs
        else:
            doc["tables"] = [*doc["tables"], *segs] * 3
        ed.publish(doc)
    return img, base_expect(base, f"chunk table {_brief(recipe, 2000)}")


# ---- strategies: root slots and the header -----------------------------------------------

slot_recipe = st.fixed_dictionaries({
    "which": st.sampled_from(["current", "other"]),
    "generation": st.one_of(st.sampled_from(["cur+1", "cur", "cur-1", "older"]),
                            st.sampled_from([0, 2 ** 63, 2 ** 64 - 1])),
    "offset": st.one_of(st.sampled_from(["commit", "older", "pack", "meta", "table", "end"]),
                        st.sampled_from([0, 512, 4095, 4096 + 1, 2 ** 63, 2 ** 64 - 1])),
    "length": st.one_of(st.sampled_from(["frame", "frame-1", "frame+1", "to-end"]),
                        st.sampled_from([0, 1, 40, 64 * 2 ** 20 + 1, 2 ** 64 - 1])),
    "digest": st.sampled_from(["right", "right", "right", "zero"]),
})
HEADER_EDGES = [0, 1, 1023, 1024, 16384, 65536, 262144, 1 << 20, 8 << 20, 16 << 20,
                2 ** 32 - 1]
header_recipe = st.dictionaries(
    st.sampled_from(["version", "header_size", "chunk_min", "chunk_avg", "chunk_max",
                     "pack_target"]),
    st.one_of(st.sampled_from(HEADER_EDGES), st.sampled_from([2, 4095, 4096, 4097]),
              st.integers(0, 2 ** 32 - 1)), max_size=3)
slots_recipe = st.fixed_dictionaries({
    "slots": st.lists(slot_recipe, max_size=2), "header": header_recipe})


def build_slots(base: Base, work: Path, recipe: dict) -> tuple[Path, Expect]:
    img = new_image(base, work)
    size = os.path.getsize(img)
    slots = [read_slot(img, 0), read_slot(img, 1)]
    cur = max(s for s in slots if s is not None)
    cur_which = slots.index(cur)
    older = min(s for s in slots if s is not None)
    frame_len = {off: n for off, _k, n in base.frames}
    for s in recipe["slots"]:
        which = cur_which if s["which"] == "current" else 1 - cur_which
        gen = {"cur+1": cur[0] + 1, "cur": cur[0], "cur-1": cur[0] - 1,
               "older": older[0]}.get(s["generation"], s["generation"])
        off = {"commit": cur[1], "older": older[1], "pack": _frame_of(base, F.KIND_PACK),
               "meta": _frame_of(base, F.KIND_META), "table": _frame_of(base, F.KIND_TABLE),
               "end": size}.get(s["offset"], s["offset"])
        n = frame_len.get(off, 100)
        length = {"frame": n, "frame-1": n - 1, "frame+1": n + 1,
                  "to-end": max(size - off, 0)}.get(s["length"], s["length"])
        write_slot(img, which, gen, off, length, bytes(16) if s["digest"] == "zero" else None)
    if recipe["header"]:
        write_header(img, **recipe["header"])
    return img, base_expect(base, f"slots and header {_brief(recipe, 2000)}")


# ---- the property tests ------------------------------------------------------------------

Builder = Callable[[Base, Path, dict], tuple[Path, Expect]]


def verbs_hold(base: Base, scratch: Path, build: Builder, recipe: dict,
               verbs: tuple[str, ...] = tuple(VERBS)) -> None:
    with example_dir(scratch) as work:
        img, expect = build(base, work, recipe)
        report(check_verbs(img, work, expect, verbs), expect)


@FAST
@given(recipe=commit_recipe)
def test_hostile_commit_records(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_commit, recipe)


@FAST
@given(recipe=records_recipe)
def test_hostile_records(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_records, recipe)


@FAST
@given(recipe=extents_recipe)
def test_hostile_extents(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_extents, recipe)


@FAST
@given(recipe=tables_recipe)
def test_hostile_chunk_tables(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_tables, recipe,
               ("info", "ls-R", "extract", "verify", "verify-json", "export", "export-moved",
                "optimize"))


@FAST
@given(recipe=slots_recipe)
def test_hostile_slots_and_header(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_slots, recipe,
               ("info", "info-json", "ls-R", "extract", "verify", "diff", "export"))


any_recipe = st.one_of(
    st.tuples(st.just("records"), records_recipe),
    st.tuples(st.just("extents"), extents_recipe),
    st.tuples(st.just("commit"), commit_recipe),
)
BUILDERS: dict[str, Builder] = {"records": build_records, "extents": build_extents,
                                "commit": build_commit, "tables": build_tables,
                                "slots": build_slots}


def mount_holds(base: Base, scratch: Path, kind: str, recipe: dict) -> None:
    with example_dir(scratch) as work:
        img, expect = BUILDERS[kind](base, work, recipe)
        report(check_mount(img, work, expect), expect)


@settings(FAST, max_examples=5)
@given(case=any_recipe)
def test_hostile_read_only_mount(base: Base, scratch: Path, case: tuple[str, dict]) -> None:
    mount_holds(base, scratch, *case)


# ---- the daemon --------------------------------------------------------------------------

APP_CODES = {-(32000 + c) for c in DOCUMENTED if c}


@pytest.fixture(scope="module")
def daemon_sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from daemon_helpers import daemon_process

    root = tmp_path_factory.mktemp("crafted-daemon")
    with daemon_process(root) as d:
        yield d.sock


def check_daemon(sock: Path, img: Path, work: Path, expect: Expect) -> list[str]:
    from daemon.client import Client
    from daemon.protocol import RpcError

    bad: list[str] = []
    idx = int(expect.index)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("images.info", {"image": str(img)}),
        ("images.info", {"image": str(img), "index": idx, "history": True}),
        ("images.diff", {"image": str(img), "index": int(expect.other), "other": idx}),
        ("images.verify", {"image": str(img)}),
        ("images.export", {"image": str(img), "index": idx, "dest": str(work / "export.ifs"),
                           "level": 1}),
    ]
    try:
        with Client(str(sock), timeout=TIME_LIMIT + 10) as c:
            for method, params in calls:
                start = time.monotonic()
                try:
                    answer = c.call(method, **params)
                    if isinstance(answer, dict) and "job" in answer and "state" in answer:
                        done = c.wait_job(answer["job"])
                        if done["state"] == "failed":
                            code = done["error"]["code"]
                            if code not in APP_CODES:
                                bad.append(f"{method} job failed with code {code}: "
                                           f"{done['error']}")
                        elif done["state"] != "done":
                            bad.append(f"{method} job ended {done['state']}: {done}")
                except RpcError as e:
                    if e.code not in APP_CODES:
                        bad.append(f"{method} answered code {e.code}: {e.message}")
                took = time.monotonic() - start
                if took > TIME_LIMIT:
                    bad.append(f"{method} took {took:.1f}s")
            c.call("daemon.status")
    except (OSError, ConnectionError) as e:
        bad.append(f"the daemon did not answer: {e!r}")
    left = set(os.listdir(work)) - ALLOWED_IN_WORK
    if left:
        bad.append(f"written outside the destinations: {sorted(left)}")
    return bad


@settings(FAST, max_examples=5)
@given(case=any_recipe)
def test_hostile_images_through_the_daemon(base: Base, scratch: Path, daemon_sock: Path,
                                           case: tuple[str, dict]) -> None:
    kind, recipe = case
    with example_dir(scratch) as work:
        img, expect = BUILDERS[kind](base, work, recipe)
        report(check_daemon(daemon_sock, img, work, expect), expect)


# ---- the long run ------------------------------------------------------------------------


@pytest.mark.slow
@LONG
@given(recipe=commit_recipe)
def test_long_hostile_commit_records(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_commit, recipe)


@pytest.mark.slow
@LONG
@given(recipe=records_recipe)
def test_long_hostile_records(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_records, recipe)


@pytest.mark.slow
@LONG
@given(recipe=extents_recipe)
def test_long_hostile_extents(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_extents, recipe)


@pytest.mark.slow
@LONG
@given(recipe=tables_recipe)
def test_long_hostile_chunk_tables(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_tables, recipe)


@pytest.mark.slow
@LONG
@given(recipe=slots_recipe)
def test_long_hostile_slots_and_header(base: Base, scratch: Path, recipe: dict) -> None:
    verbs_hold(base, scratch, build_slots, recipe)


@pytest.mark.slow
@settings(LONG, max_examples=40)
@given(case=any_recipe)
def test_long_hostile_read_only_mount(base: Base, scratch: Path,
                                      case: tuple[str, dict]) -> None:
    mount_holds(base, scratch, *case)


# ---- known hostile cases, one test each --------------------------------------------------


def _set_history(doc: dict, value: Any) -> dict:
    doc["indices"][1]["history"] = value
    return doc


def _many(doc: dict, ed: Editor, base: Base) -> dict:
    many_indices(doc, 50_000, big_root(ed))
    return doc


def _repeated(doc: dict, ed: Editor, base: Base) -> dict:
    doc["tables"] = [[big_segment(ed, base), BIG_SEGMENT]] * 20_000
    return doc


def _index(doc: dict, **fields: Any) -> dict:
    doc["indices"][1].update(fields)
    return doc


CommitCase = Callable[[dict, Editor, Base], Any]
COMMIT_CASES: dict[str, CommitCase] = {
    "deep-history": lambda d, ed, b: _set_history(d, [{"result": deep(100_000)}]),
    "deep-history-990": lambda d, ed, b: _set_history(d, [{"result": deep(990, "dict")}]),
    "short-tables-entry": lambda d, ed, b: {**d, "tables": [[4096]]},
    "short-tables-entry-2597103": lambda d, ed, b: {**d, "tables": [[2597103]]},
    "empty-tables-entry": lambda d, ed, b: {**d, "tables": [[]]},
    "lone-surrogate-name": lambda d, ed, b: _index(d, name="\ud800"),
    "lone-surrogate-description": lambda d, ed, b: _index(d, description="a\udcff\ud800"),
    "lone-surrogate-history": lambda d, ed, b: _set_history(d, [{"user": "\ud800",
                                                                 "when": "x"}]),
    "huge-int-files": lambda d, ed, b: _index(d, files=2 ** 64),
    "negative-bytes": lambda d, ed, b: _index(d, bytes=-1),
    "float-chunks": lambda d, ed, b: {**d, "chunks": 1.5},
    "tables-a-string": lambda d, ed, b: {**d, "tables": "x"},
    "indices-a-dict": lambda d, ed, b: {**d, "indices": {"a": 1}},
    "index-a-list": lambda d, ed, b: {**d, "indices": [[1, 2]]},
    "table-segment-of-2000-listed-20000-times": _repeated,
    "50000-indices-sharing-a-300-file-root": _many,
    "doc-a-list": lambda d, ed, b: [d],
    "doc-deep": lambda d, ed, b: deep(100_000),
}


@pytest.mark.parametrize("case", list(COMMIT_CASES))
def test_known_commit_case(base: Base, scratch: Path, case: str) -> None:
    def build(base: Base, work: Path, _r: dict) -> tuple[Path, Expect]:
        img = new_image(base, work)
        with Editor(img) as ed:
            ed.publish(COMMIT_CASES[case](ed.commit_doc(), ed, base))
        return img, base_expect(base, f"commit case {case}")
    verbs_hold(base, scratch, build, {})


def _records_case(make: Callable[[Base, Path], tuple[list[tuple[bytes, Rec]],
                                                     dict[str, Any]]]) -> Builder:
    def build(base: Base, work: Path, _r: dict) -> tuple[Path, Expect]:
        img = new_image(base, work)
        kids, files = make(base, work)
        with Editor(img) as ed:
            add_index(ed, dir_rec(kids), "crafted", shas=base.shas)
        return img, Expect("3", "2", files, True, "records case")
    return build


def _genuine(base: Base, i: int = 0) -> tuple[Any, bytes]:
    c = sorted(base.chunks, key=lambda c: -c.length)[i]
    return c, base.packs[c.pack][c.offset:c.offset + c.length]


def _size_2_63(base: Base, work: Path) -> tuple[list, dict]:
    return [(b"huge", file_rec(2 ** 63))], {"/huge": bytes(LIMIT)}


def _xattr_nul(base: Base, work: Path) -> tuple[list, dict]:
    r = file_rec(0)
    r.ino.xattrs = [(b"user.a\x00b", b"v")]
    return [(b"f", r)], {"/f": b""}


def _symlink_nul(base: Base, work: Path) -> tuple[list, dict]:
    return [(b"l", link_rec(b"a\x00b"))], {}


def _bad_rdev(base: Base, work: Path) -> tuple[list, dict]:
    r = Rec(ino(F.REG))
    r.ino.kind, r.ino.mode, r.ino.rdev = F.CHR, stat.S_IFCHR | 0o600, 2 ** 64 - 1
    return [(b"dev", r)], {}


def _xattr_weird(base: Base, work: Path) -> tuple[list, dict]:
    r = file_rec(0)
    r.ino.xattrs = [(b"x", b"v"), (b"user.\xff", b"")]
    return [(b"f", r)], {"/f": b""}


def _same_offset_other_length(base: Base, work: Path) -> tuple[list, dict]:
    c, data = _genuine(base)
    r = file_rec(c.length + c.length + 1, [(0, c.pack, c.offset, c.length, c.xxh),
                                           (c.length, c.pack, c.offset, c.length + 1,
                                            bytes(16))])
    return [(b"a-genuine", file_rec(c.length, [(0, c.pack, c.offset, c.length, c.xxh)])),
            (b"b-crafted", r)], {"/a-genuine": data, "/b-crafted": None}


def _newline_name(base: Base, work: Path) -> tuple[list, dict]:
    # apply and extract fail on it (no file may be 2**62 bytes): the name is in the message
    return [(b"a\nb\x1b[31m", file_rec(2 ** 62))], {}


def _newline_xattr(base: Base, work: Path) -> tuple[list, dict]:
    r = file_rec(0)
    r.ino.xattrs = [(b"system.a\nb", b"v")]  # no such system.* xattr: apply is refused
    return [(b"f", r)], {"/f": b""}


def _kind_lie(base: Base, work: Path) -> tuple[list, dict]:
    c, data = _genuine(base)
    f = file_rec(c.length, [(0, c.pack, c.offset, c.length, c.xxh)])
    return [(b"f", f, F.DIR)], {"/f": data}  # type: ignore[list-item]


RECORD_CASES: dict[str, Callable[[Base, Path], tuple[list, dict]]] = {
    "name-with-newline-in-an-error": _newline_name,
    "xattr-name-with-newline-in-an-error": _newline_xattr,
    "entry-kind-dir-for-a-file": _kind_lie,
    "size-2**63": _size_2_63,
    "xattr-name-nul": _xattr_nul,
    "symlink-target-nul": _symlink_nul,
    "chardev-rdev-2**64-1": _bad_rdev,
    "xattr-names-weird": _xattr_weird,
    "extent-same-offset-other-length-zero-hash": _same_offset_other_length,
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_known_record_case(base: Base, scratch: Path, case: str) -> None:
    build = _records_case(RECORD_CASES[case])
    with example_dir(scratch) as work:
        img, expect = build(base, work, {})
        expect.note = f"record case {case}"
        bad = check_verbs(img, work, expect)
        if case == "extent-same-offset-other-length-zero-hash":
            bad += check_mount(img, work, expect)
        report(bad, expect)


def test_sound_image_keeps_every_promise(base: Base, scratch: Path) -> None:
    """The checker itself: a sound image (and a sound crafted index) passes everything."""
    with example_dir(scratch) as work:
        img = new_image(base, work)
        expect = base_expect(base, "nothing (the base image)")
        report(check_verbs(img, work, expect), expect)
        for v in ("verify", "extract", "apply"):
            assert (work / v).exists() or v == "verify"
    with example_dir(scratch) as work:
        img, expect = build_extents(base, work, {"files": [
            {"extents": [(0, "ok", "real"), (1, "ok", "real")], "layout": "seq",
             "size": "exact"}], "table": "none"})
        assert all(v is not None for v in expect.files.values())
        report(check_verbs(img, work, expect) + check_mount(img, work, expect), expect)


def test_crafted_helper_round_trip(base: Base, scratch: Path) -> None:
    """rewrite_commit and append_table_segment keep a sound image sound."""
    with example_dir(scratch) as work:
        img = new_image(base, work)
        with Editor(img) as ed:
            doc = ed.commit_doc()
        gen, off, n = rewrite_commit(img, doc)
        assert read_slot(img, gen % 2) is not None
        c = base.chunks[0]
        append_table_segment(img, [table_entry(c.xxh, c.sha, c.pack, c.offset, c.length)])
        r = run_verb("verify", img)
        assert r.code == 0, str(r)
