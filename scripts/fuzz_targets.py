"""Coverage-guided fuzz targets for imagefs's decoders (atheris, i.e. libFuzzer for Python).

Run through scripts/fuzz (see its header).  Directly:

    python scripts/fuzz_targets.py drive TARGET|all SECONDS   fuzz, report executions/crashes
    python scripts/fuzz_targets.py seeds DIR                  write seed corpora DIR/TARGET/
    python scripts/fuzz_targets.py repro TARGET FILE          one input, with its traceback
    IMAGEFS_FUZZ_TARGET=T python scripts/fuzz_targets.py [libFuzzer flags] [CORPUS...]

Targets (what one input is; "ctrl" is a first byte whose bits say which checksums the target
recomputes, so that mutated inputs get past the checks to the parsers behind them):

    header  ctrl + the file's first bytes         ImageFile.parse_header (bit 0: header check)
    slots   ctrl + a whole small image            read_slots, read_commit (bit 0: slot checks
                                                  and xxh3-128, bit 1: the commit frame's)
    frame   ctrl + a frame at offset 4096         frame_info + decode_payload (bit 0: checks;
                                                  bit 1: the payload is raw, zstd it here)
    meta    a metadata block's raw payload        MetaReader.block + get of every record
    record  one inode record                      records.decode_inode, then re-encoding
    commit  a commit record's JSON                commit_record.Commit.decode, re-encoding,
                                                  `imagefs info --history [--json]` on it
    table   ctrl + u32 count + segment payload    packs.ChunkTable.load (bit 0: two segments)

A crash is any exception that is not imagefs.errors.Error (an AssertionError included: a
decoded record or commit that does not survive re-encoding, or `imagefs info` ending in
its internal error, exit 70).  By default a run goes on after a crash: each distinct one
(exception type and the innermost imagefs line) is saved once as a reproducer and reported;
IMAGEFS_FUZZ_STOP=1 stops at the first, as libFuzzer does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["header", "slots", "frame", "meta", "record", "commit", "table"]
# libFuzzer dictionaries: tokens worth splicing in (written next to each target's corpus).
DICTS = {
    "commit": ['"\\ud800"', '"\\udcff"', '"\\u0000"', "[[", "]]", '{"a":', "[[4096]]",
               "[[]]", "18446744073709551616", "9223372036854775808", "4611686018427387905",
               "-1", "1e999", "NaN", "Infinity", "1.5", "null", "true", '"tables"',
               '"indices"', '"history"', '"root"', '"generation"', '"format"', '"name"',
               '"bytes"', '"files"', '"dirs"', '"digest"', '"chunks"', '"result"', "[{}]",
               "{}", "[]"],
}
MAX_LEN = {"header": 4200, "slots": 16384, "frame": 8192, "meta": 8192, "record": 4096,
           "commit": 8192, "table": 4096}


def work_dir() -> Path:
    return Path(os.environ.get("IMAGEFS_FUZZ_DIR")
                or Path.home() / ".cache" / "imagefs" / "fuzz")


# ---- the targets (imported under atheris instrumentation when fuzzing) -------------------


def _load() -> dict[str, Callable[[bytes], None]]:
    """Import imagefs and define the targets (after instrumentation has been set up)."""
    import xxhash
    import zstandard

    from imagefs.errors import Error
    from imagefs.format import layout as F
    from imagefs.format.commit_record import Commit
    from imagefs.format.container import ImageFile
    from imagefs.format.digest import node_digest
    from imagefs.format.packs import ChunkTable
    from imagefs.format.records import Inode, MetaReader, decode_inode

    fd = os.memfd_create("imagefs-fuzz")
    path = f"/proc/self/fd/{fd}"
    header_bytes = ImageFile.new_header()
    _put(fd, header_bytes)
    header = ImageFile.parse_header("header", fd)

    def image(data: bytes) -> ImageFile:
        _put(fd, data)
        return ImageFile("fuzz.ifs", fd, header, False)

    def fix_frame(buf: bytearray, off: int, payload: bool = True) -> None:
        """Recompute the checks of the frame header at off (and its payload's)."""
        if off + F.FRAME_HEADER > len(buf):
            return
        magic, codec, stored, raw, _check = F.FRAME.unpack_from(buf, off)
        if payload:
            body = bytes(buf[off + F.FRAME_HEADER:off + F.FRAME_HEADER + stored])
            F.FRAME.pack_into(buf, off, magic, codec, stored, raw,
                              xxhash.xxh3_64_intdigest(body))
        buf[off + F.FRAME.size:off + F.FRAME_HEADER] = xxhash.xxh3_64_intdigest(
            bytes(buf[off:off + F.FRAME.size])).to_bytes(8, "little")

    def t_header(data: bytes) -> None:
        if not data:
            return
        buf = bytearray(data[1:])
        if data[0] & 1 and len(buf) >= F.HEADER.size + 8:
            buf[F.HEADER.size:F.HEADER.size + 8] = xxhash.xxh3_64_intdigest(
                bytes(buf[:F.HEADER.size])).to_bytes(8, "little")
        _put(fd, bytes(buf))
        ImageFile.parse_header("fuzz.ifs", fd)

    def t_slots(data: bytes) -> None:
        if not data:
            return
        buf = bytearray(header_bytes) + bytearray(data[1 + F.HEADER_SIZE:])
        head = data[1:1 + F.HEADER_SIZE]
        for at in F.SLOT_OFFSETS:  # the slots come from the input, the rest is a header
            buf[at:at + F.SLOT_SIZE] = head[at:at + F.SLOT_SIZE].ljust(F.SLOT_SIZE, b"\0")
        for at in F.SLOT_OFFSETS:
            raw = bytes(buf[at:at + F.SLOT_SIZE])
            if raw == bytes(F.SLOT_SIZE):
                continue
            magic, gen, coff, clen, digest, res = F.SLOT.unpack_from(raw)
            if data[0] & 2 and F.HEADER_SIZE <= coff < len(buf):
                fix_frame(buf, coff)
            if data[0] & 1:
                if coff + clen <= len(buf):
                    digest = xxhash.xxh3_128_digest(bytes(buf[coff:coff + clen]))
                body = F.SLOT.pack(magic, gen, coff, clen, digest, res)
                buf[at:at + F.SLOT_SIZE] = body + xxhash.xxh3_64_intdigest(body).to_bytes(
                    8, "little")
        f = image(bytes(buf))
        f.read_slots()
        f.read_commit()

    def t_frame(data: bytes) -> None:
        if len(data) < 1 + F.FRAME_HEADER:
            return
        buf = bytearray(data[1:])
        if data[0] & 2:  # the payload is raw: compress it, lengths as the header says
            magic, codec, _stored, rawlen, check = F.FRAME.unpack_from(buf)
            raw = bytes(buf[F.FRAME_HEADER:])
            payload = zstandard.ZstdCompressor(level=1, write_content_size=bool(
                data[0] & 4)).compress(raw)
            F.FRAME.pack_into(buf, 0, magic, 1, len(payload),
                              len(raw) if data[0] & 8 else rawlen, check)
            buf[F.FRAME_HEADER:] = payload
        if data[0] & 1:
            fix_frame(buf, 0)
        f = image(header_bytes + bytes(buf))
        kind = None if data[0] & 16 else bytes(buf[3:4])
        info = f.frame_info(F.HEADER_SIZE, kind)
        f.decode_payload(info, os.pread(fd, info.stored, F.HEADER_SIZE + F.FRAME_HEADER))
        f.read_frame_info(F.HEADER_SIZE)

    def check_inode(ino: Inode) -> None:
        """A decoded record survives re-encoding, and its digest can be taken."""
        enc = ino.encode()
        again = decode_inode(enc, "re-encoded record")
        for name in ("kind", "mode", "uid", "gid", "nlink", "size", "rdev", "mtime_ns",
                     "atime_ns", "ctime_ns", "digest", "xattrs", "extents", "target",
                     "entries"):
            a, b = getattr(ino, name), getattr(again, name)
            assert a == b, f"record field {name} changes when re-encoded: {a!r} -> {b!r}"
        node_digest(ino, [bytes(32)] * len(ino.extents), [bytes(32)] * len(ino.entries))

    def t_meta(data: bytes) -> None:
        head = F.FRAME.pack(F.FRAME_MAGIC + F.KIND_META, F.CODEC_STORED, len(data), len(data),
                            xxhash.xxh3_64_intdigest(data))
        head += xxhash.xxh3_64_intdigest(head).to_bytes(8, "little")
        f = image(header_bytes + head + data)
        meta = MetaReader(f)
        raw, offsets = meta.block(F.HEADER_SIZE)
        for i in range(min(len(offsets) - 1, 64)):
            with contextlib.suppress(Error):
                check_inode(meta.get(F.HEADER_SIZE << 16 | i))

    def t_record(data: bytes) -> None:
        check_inode(decode_inode(data, "fuzz record"))

    def t_commit(data: bytes) -> None:
        c = Commit.decode(data, "fuzz commit", 1 << 20)
        again = Commit.decode(c.encode(), "re-encoded commit", 1 << 20)
        again.data_end = c.data_end
        assert again == c, f"the commit record changes when re-encoded:\n{c}\n{again}"
        info_cli(data)

    def info_cli(raw: bytes) -> None:
        """`imagefs info --history` and `--json` on an image whose commit record is raw:
        anything but exit 70 (an internal error) is fine."""
        from imagefs.cli import main

        frame = bytearray(F.FRAME.pack(F.FRAME_MAGIC + F.KIND_COMMIT, F.CODEC_STORED,
                                       len(raw), len(raw), 0) + bytes(8) + raw)
        fix_frame(frame, 0)
        try:
            gen = json.loads(raw).get("generation", 1)
        except (ValueError, AttributeError, RecursionError):
            gen = 1
        gen = gen if type(gen) is int and 0 <= gen < 1 << 64 else 1
        body = F.SLOT.pack(F.SLOT_MAGIC, gen, F.HEADER_SIZE, len(frame),
                           xxhash.xxh3_128_digest(bytes(frame)), bytes(8))
        slot = body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")
        head = bytearray(header_bytes)
        at = F.SLOT_OFFSETS[gen % 2]
        head[at:at + F.SLOT_SIZE] = slot
        _put(fd, bytes(head) + bytes(frame))
        for argv in (["info", path, "--history"], ["info", path, "--json", "--history"]):
            out, err = io.BytesIO(), io.StringIO()
            saved = sys.stdout, sys.stderr
            wrapper = io.TextIOWrapper(out, encoding="utf-8", errors="strict")
            sys.stdout, sys.stderr = wrapper, err
            try:
                code = main(argv)
                with contextlib.suppress(ValueError):  # a failed write left it unflushable
                    wrapper.flush()
                printed = out.getvalue()
            finally:
                sys.stdout, sys.stderr = saved
                with contextlib.suppress(ValueError):
                    wrapper.detach()  # so that collecting it does not close `out`
            assert code != 70, f"imagefs {' '.join(argv[:1] + argv[2:])}: {err.getvalue()}"
            if code == 0 and "--json" in argv:
                json.loads(printed.decode("utf-8"))

    def t_table(data: bytes) -> None:
        if len(data) < 5:
            return
        (count,) = struct.unpack_from("<I", data, 1)
        payload = data[5:]
        parts = [payload] if not data[0] & 1 else [payload[:len(payload) // 2],
                                                   payload[len(payload) // 2:]]
        out = bytearray(header_bytes)
        tables = []
        for i, part in enumerate(parts):
            head = F.FRAME.pack(F.FRAME_MAGIC + F.KIND_TABLE, F.CODEC_STORED, len(part),
                                len(part), xxhash.xxh3_64_intdigest(part))
            tables.append([len(out), count if i == 0 else len(part) // F.CHUNK_ENTRY.size])
            out += head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + part
        f = image(bytes(out))
        commit = Commit(tables=tables, data_end=len(out))
        table = ChunkTable.load(f, commit)
        locs = table.all()
        assert len(locs) == table.count, "the table lost or grew entries"
        for loc in locs[:32]:
            assert table.find(loc.xxh, loc.sha) is not None

    return {"header": t_header, "slots": t_slots, "frame": t_frame, "meta": t_meta,
            "record": t_record, "commit": t_commit, "table": t_table}


def _put(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


# ---- crash bookkeeping -------------------------------------------------------------------


def signature(e: BaseException) -> str:
    """The exception type and the innermost imagefs line it passed (else the innermost)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/imagefs/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(e).__name__} at {where}"


class Crashes:
    def __init__(self, target: str) -> None:
        self.target = target
        self.dir = work_dir() / target / "crashes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()

    def add(self, data: bytes, e: BaseException) -> None:
        sig = signature(e)
        if sig in self.seen:
            return
        self.seen.add(sig)
        name = "crash-" + hashlib.sha1(sig.encode()).hexdigest()[:12]
        path = self.dir / name
        path.write_bytes(data)
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        line = (f"CRASH target={self.target} sig={sig} reproducer={path} "
                f"last={last[:300]!r}")
        print(line, file=sys.stderr, flush=True)
        with open(self.dir / "crashes.txt", "a") as fh:
            fh.write(line + "\n")


def fuzz_main() -> None:
    import atheris

    target = os.environ.get("IMAGEFS_FUZZ_TARGET", "")
    if target not in TARGETS:
        sys.exit(f"IMAGEFS_FUZZ_TARGET must be one of {', '.join(TARGETS)}")
    with atheris.instrument_imports(include=["imagefs"]):
        targets = _load()
        import imagefs.cli.info_cmd  # noqa: F401 - the commit target runs it
    from imagefs.errors import Error

    fn = targets[target]
    stop = os.environ.get("IMAGEFS_FUZZ_STOP") == "1"
    crashes = Crashes(target)

    def one(data: bytes) -> None:
        try:
            fn(data)
        except Error:
            pass
        except Exception as e:
            if stop:
                raise
            crashes.add(data, e)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


def repro(target: str, file: str) -> int:
    from imagefs.errors import Error

    fn = _load()[target]
    data = Path(file).read_bytes()
    try:
        fn(data)
    except Error as e:
        print(f"imagefs error (fine): {type(e).__name__}: {e}")
        return 0
    print("no exception")
    return 0


# ---- seeds -------------------------------------------------------------------------------


def build_seeds(out: Path) -> None:
    """Seed corpora from a real image of a small tree (two indices), a few KB each."""
    from imagefs.format import layout as F
    from imagefs.image import capture

    tmp = Path(tempfile.mkdtemp(prefix="imagefs-fuzz-seeds-"))
    try:
        src = tmp / "src"
        (src / "d").mkdir(parents=True)
        (src / "a").write_bytes(b"hello\n")
        (src / "d" / "b").write_bytes(bytes(range(256)) * 2)
        os.symlink("a", src / "l")
        with contextlib.suppress(OSError):
            os.setxattr(src / "a", b"user.note", b"seed")
        img = tmp / "seed.ifs"
        capture(str(img), str(src), "one", level=1)
        (src / "c").write_bytes(b"second index\n")
        capture(str(img), str(src), "two", level=1)
        data = img.read_bytes()
        seeds: dict[str, list[bytes]] = {t: [] for t in TARGETS}
        seeds["header"] += [b"\x01" + data[:F.HEADER_SIZE], b"\x00" + data[:F.HEADER_SIZE]]
        seeds["slots"] += [b"\x03" + data, b"\x00" + data]
        pos = F.HEADER_SIZE
        import zstandard
        while pos < len(data):
            magic, codec, stored, rawlen, _c = F.FRAME.unpack_from(data, pos)
            frame = data[pos:pos + F.FRAME_HEADER + stored]
            raw = zstandard.ZstdDecompressor().decompress(frame[F.FRAME_HEADER:],
                                                          max_output_size=rawlen)
            seeds["frame"] += [b"\x01" + frame, b"\x0f" + frame[:F.FRAME_HEADER] + raw]
            kind = magic[3:]
            if kind == F.KIND_META:
                seeds["meta"].append(raw)
                (count,) = F.U32.unpack_from(raw)
                offs = [F.U32.unpack_from(raw, 4 + 4 * i)[0] for i in range(count + 1)]
                seeds["record"] += [raw[a:b] for a, b in zip(offs, offs[1:], strict=False)]
            elif kind == F.KIND_COMMIT:
                seeds["commit"].append(raw)
            elif kind == F.KIND_TABLE:
                n = len(raw) // F.CHUNK_ENTRY.size
                seeds["table"] += [b"\x00" + struct.pack("<I", n) + raw,
                                   b"\x01" + struct.pack("<I", n) + raw]
            pos += F.FRAME_HEADER + stored
        for target, items in seeds.items():
            d = out / target
            d.mkdir(parents=True, exist_ok=True)
            for item in items:
                (d / ("seed-" + hashlib.sha1(item).hexdigest()[:12])).write_bytes(item)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the driver --------------------------------------------------------------------------


def drive(which: str, seconds: int) -> int:
    targets = TARGETS if which == "all" else [which]
    if any(t not in TARGETS for t in targets):
        print(f"unknown target {which!r}; targets: {', '.join(TARGETS)} or all",
              file=sys.stderr)
        return 2
    seeds = REPO / "fuzz" / "corpus"
    if any(not (seeds / t).is_dir() or not any((seeds / t).iterdir()) for t in targets):
        print(f"building seed corpora in {seeds}", flush=True)
        build_seeds(seeds)
    each = max(seconds // len(targets), 5)
    total_crashes = []
    summary = []
    for t in targets:
        base = work_dir() / t
        corpus = base / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        (base / "crashes").mkdir(parents=True, exist_ok=True)
        log = base / "last-run.log"
        argv = [sys.executable, __file__, f"-max_total_time={each}", "-timeout=20",
                "-rss_limit_mb=3072", f"-max_len={MAX_LEN[t]}", "-print_final_stats=1",
                f"-artifact_prefix={base / 'crashes'}/", str(corpus), str(seeds / t)]
        if t in DICTS:
            (base / "dict").write_text("".join(f"{json.dumps(tok)}\n" for tok in DICTS[t]))
            argv.insert(2, f"-dict={base / 'dict'}")
        print(f"== {t}: fuzzing for {each}s (corpus {corpus}, log {log})", flush=True)
        start = time.monotonic()
        with open(log, "wb") as fh:
            p = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, "IMAGEFS_FUZZ_TARGET": t})
        text = log.read_text(errors="replace")
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text) or \
            re.findall(r"Done (\d+) runs", text)
        execs = int(runs[-1]) if runs else 0
        if not runs:
            execs = max([int(n) for n in re.findall(r"^#(\d+)\s", text, re.M)] or [0])
        crashes = re.findall(r"^CRASH .*$", text, re.M)
        artifacts = re.findall(r"Test unit written to (\S+)", text)
        dead = p.returncode != 0 and not crashes and not artifacts
        for a in artifacts:
            kind = re.search(r"==\d+== ERROR: libFuzzer: ([^\n]+)", text)
            crashes.append(f"CRASH target={t} libFuzzer: "
                           f"{kind.group(1) if kind else 'stopped'} reproducer={a}")
        if dead:
            crashes.append(f"CRASH target={t} the fuzzer exited {p.returncode}; see {log}")
        summary.append(f"{t:>7}: {execs} executions in {time.monotonic() - start:.0f}s, "
                       f"corpus {sum(1 for _ in corpus.iterdir())} inputs, "
                       f"{len(crashes)} distinct crash(es)")
        print(summary[-1], flush=True)
        for c in crashes:
            print("   " + c, flush=True)
        total_crashes += crashes
    if len(targets) > 1:
        print("== summary")
        print("\n".join(summary))
    if total_crashes:
        print(f"{len(total_crashes)} distinct crash(es); reproduce one with: scripts/fuzz repro "
              "TARGET FILE")
    return 1 if total_crashes else 0


def main() -> int:
    args = sys.argv[1:]
    sys.path.insert(0, str(REPO))
    if args and args[0] == "seeds":
        build_seeds(Path(args[1]) if len(args) > 1 else REPO / "fuzz" / "corpus")
        return 0
    if args and args[0] == "repro":
        if len(args) != 3 or args[1] not in TARGETS:
            print("usage: fuzz_targets.py repro TARGET FILE", file=sys.stderr)
            return 2
        return repro(args[1], args[2])
    if args and args[0] == "drive":
        if len(args) not in (2, 3):
            print("usage: fuzz_targets.py drive TARGET|all [SECONDS]", file=sys.stderr)
            return 2
        return drive(args[1], int(args[2]) if len(args) == 3 else 60)
    if args and args[0] == "list":
        print("\n".join(TARGETS))
        return 0
    fuzz_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
