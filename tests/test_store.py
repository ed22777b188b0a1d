"""Indices pushed to and pulled from a real S3 store (SeaweedFS on loopback): issue 18.

Two fixture trees are the two indices of one image: bookworm-minbase (1, "minbase") and
bookworm-web (2, "web"), which shares most of its content with it.  Pushing sends only what
the store lacks; pulling fetches only what the local file lacks, checks every object
against its name, and leaves the local file as it was when anything goes wrong.  rsync is
the equality oracle for what is applied from a pulled file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cli_zygote
import pytest
from conftest import copy_image, fixture_tree, mounted, rsync_diff, run_imagefs, unmount_hard
from store_helpers import NEEDS_WEED, Weed, weed_server

pytestmark = NEEDS_WEED

STORE = "s3://golden/site-a"


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    with weed_server(tmp_path_factory.mktemp("weed")) as w:
        yield w


@pytest.fixture(scope="module")
def two(minbase_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """minbase (index 1) and web (index 2) in one image; never changed."""
    path = copy_image(minbase_image, tmp_path_factory.mktemp("two") / "two.imagefs")
    run_imagefs("capture", fixture_tree("bookworm-web"), path, "--name", "web")
    return path


@pytest.fixture(scope="module")
def pushed(weed: Weed, two: Path) -> dict:
    """Both indices pushed, minbase first then web: what each push reported."""
    first = store("push", two, "minbase", STORE, weed=weed)
    second = store("push", two, "web", STORE, weed=weed)
    return {"minbase": first["indices"][0], "web": second["indices"][0]}


def store(*args: str | Path, weed: Weed, check: bool = True) -> dict:
    out = run_imagefs(*args, "--json", env=weed.env(), check=check)
    return json.loads(out.stdout) if out.returncode == 0 else {"exit": out.returncode,
                                                               "error": out.stderr.decode()}


def applied_equals(image: Path, index: str, tree: str, tmp_path: Path) -> None:
    dest = tmp_path / f"applied-{index}"
    run_imagefs("apply", image, index, dest)
    assert rsync_diff(fixture_tree(tree), dest) == ""


def test_a_push_sends_only_what_the_store_lacks(pushed: dict, weed: Weed, two: Path) -> None:
    minbase, web = pushed["minbase"], pushed["web"]
    assert minbase["packs_sent"] == minbase["packs"] > 0
    assert 0 < web["packs_sent"] < web["packs"] / 4  # web's own content only
    again = store("push", two, "web", STORE, weed=weed)["indices"][0]
    assert again["packs_sent"] == 0


def test_a_pull_fetches_only_what_the_local_file_lacks(pushed: dict, weed: Weed, two: Path,
                                                       minbase_image: Path,
                                                       tmp_path: Path) -> None:
    """Into an empty file, then into a file that holds minbase: the second pull moves at
    most 1.1x what web added to the image it was pushed from (its new packs and records)."""
    alone = tmp_path / "web.imagefs"
    got = store("pull", STORE, "web", alone, weed=weed)
    assert got["indices"] == [1] and got["names"] == ["web"]
    assert "OK" in run_imagefs("verify", alone).stdout.decode()
    applied_equals(alone, "web", "bookworm-web", tmp_path)

    local = tmp_path / "local.imagefs"
    store("pull", STORE, "minbase", local, weed=weed)
    got = store("pull", STORE, "web", local, weed=weed)
    assert got["indices"] == [2]
    web_added = two.stat().st_size - minbase_image.stat().st_size
    assert got["bytes_received"] <= 1.1 * web_added, (got, web_added)
    assert "OK" in run_imagefs("verify", local).stdout.decode()
    applied_equals(local, "2", "bookworm-web", tmp_path)
    history = json.loads(run_imagefs("info", local, "web", "--json", "--history").stdout)
    actions = [h["action"] for h in history["indices"][0]["history"]]
    assert actions[-2:] == ["push", "pull"], actions


def test_unknown_indices_and_bad_stores_are_refused(pushed: dict, weed: Weed,
                                                    tmp_path: Path) -> None:
    dest = tmp_path / "never.imagefs"
    cases = [
        (["pull", STORE, "nope", dest], 2, "no index named 'nope'"),
        (["pull", "s3://Bad_Bucket/x", "web", dest], 2, "is not a bucket name"),
        (["pull", "s3://golden/../x", "web", dest], 2, "is not a plain folder name"),
        (["pull", "https://example.com/x", "web", dest], 2, "not a store"),
        (["pull", STORE, "web", dest, "--endpoint", "http://127.0.0.1:1"], 8,
         "cannot be reached"),
        (["ls", STORE, "nope", "--cache", tmp_path / "cache"], 3,
         "no index named 'nope' (the store holds: minbase, web)"),
        (["mount", "--rw", STORE, "web", tmp_path], 2, "mounts read-only"),
    ]
    for args, code, words in cases:
        out = run_imagefs(*args, env=weed.env(), check=False)
        err = out.stderr.decode()
        assert out.returncode == code and words in err and err.count("\n") == 1, (args, err)
        assert not dest.exists()


def test_an_object_that_does_not_match_its_name_is_named_and_nothing_changes(
        pushed: dict, weed: Weed, minbase_image: Path, tmp_path: Path) -> None:
    """A byte flipped in one of web's own packs: the pull names the object and fails;
    the local file is byte for byte as it was.  The pack is put back afterwards."""
    s3 = weed.client()
    prefix = STORE.removeprefix("s3://golden/")
    ref = json.loads(s3.get_object(Bucket="golden", Key=f"{prefix}/refs/web")["Body"].read())
    bundle = s3.get_object(Bucket="golden", Key=f"{prefix}/bundles/{ref['bundle']}")["Body"]
    packs = json.loads(_pack_list(bundle.read()))["packs"]
    names = {o["Key"] for o in s3.list_objects_v2(Bucket="golden",
                                                 Prefix=f"{prefix}/packs/")["Contents"]}
    local = copy_image(minbase_image, tmp_path / "local.imagefs")
    before = local.read_bytes()
    # the last of web's packs is one of its own (minbase's are all in the local file)
    key = f"{prefix}/packs/{packs[-1][1]}"
    assert key in names
    good = s3.get_object(Bucket="golden", Key=key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    s3.put_object(Bucket="golden", Key=key, Body=bytes(bad))
    try:
        out = store("pull", STORE, "web", local, weed=weed, check=False)
        assert out["exit"] == 4 and packs[-1][1] in out["error"], out
        assert "does not match its name" in out["error"]
        assert local.read_bytes() == before
    finally:
        s3.put_object(Bucket="golden", Key=key, Body=good)


def _pack_list(bundle: bytes) -> bytes:
    length = int.from_bytes(bundle[16:20], "little")
    return bundle[20:20 + length]


def test_hostile_refs_and_bundles_get_one_line_and_nothing_is_written(
        pushed: dict, weed: Weed, tmp_path: Path) -> None:
    s3 = weed.client()
    prefix = "hostile"
    dest = tmp_path / "never.imagefs"
    missing = "0" * 64
    huge_head = b"imagefs-bundle\x00\x01" + (1 << 31).to_bytes(4, "little") + b"{}"
    huge_name = hashlib.sha256(huge_head).hexdigest()
    s3.put_object(Bucket="golden", Key=f"{prefix}/bundles/{huge_name}", Body=huge_head)
    refs = {
        "gone": {"format": 1, "index": "gone", "bundle": missing, "bytes": 100},
        "huge": {"format": 1, "index": "huge", "bundle": huge_name, "bytes": len(huge_head)},
        "big": {"format": 1, "index": "big", "bundle": missing, "bytes": 1 << 40},
        "liar": {"format": 1, "index": "other", "bundle": missing, "bytes": 100},
    }
    for name, doc in refs.items():
        s3.put_object(Bucket="golden", Key=f"{prefix}/refs/{name}",
                      Body=json.dumps(doc).encode())
    s3.put_object(Bucket="golden", Key=f"{prefix}/refs/junk", Body=os.urandom(64))
    expect = {"gone": (3, "no such object"), "huge": (4, "claims a pack list"),
              "big": (4, "names no valid bundle"), "liar": (4, "names index 'other'"),
              "junk": (4, "not JSON")}
    for name, (code, words) in expect.items():
        out = run_imagefs("pull", f"s3://golden/{prefix}", name, dest, env=weed.env(),
                          check=False)
        err = out.stderr.decode()
        assert out.returncode == code and words in err and err.count("\n") == 1, (name, err)
        assert not dest.exists()


def test_a_store_that_stops_during_a_pull_leaves_the_file_as_it_was(
        pushed: dict, weed: Weed, minbase_image: Path, tmp_path: Path) -> None:
    """The store goes away in the middle of a pull: exit code 8, one line, the local file
    unchanged; once it is back, the same pull completes."""
    local = copy_image(minbase_image, tmp_path / "local.imagefs")
    before = local.read_bytes()
    fresh = tmp_path / "fresh.imagefs"
    env = {**os.environ, **weed.env()}
    procs = [subprocess.Popen([sys.executable, "-m", "imagefs.cli", "pull", STORE, "web",
                               str(p)], env=env, stderr=subprocess.PIPE)
             for p in (local, fresh)]
    time.sleep(0.3)
    weed.stop()
    try:
        for proc in procs:
            _out, err = proc.communicate(timeout=120)
            text = err.decode()
            assert "Traceback" not in text
            if proc.returncode == 0:  # finished before the store went: a fast machine
                pytest.skip("the pull finished before the store stopped")
            assert proc.returncode == 8 and text.count("\n") == 1, text
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        weed.start()
    assert local.read_bytes() == before and not fresh.exists()
    got = store("pull", STORE, "web", local, weed=weed)
    assert got["indices"] == [2]
    assert "OK" in run_imagefs("verify", local).stdout.decode()


def test_a_pull_killed_at_random_moments_leaves_local_as_it_was_or_whole(
        pushed: dict, weed: Weed, minbase_image: Path, tmp_path: Path) -> None:
    """SIGKILL `imagefs pull STORE web LOCAL` at random moments, 12 times, into a new file
    and into a file that holds minbase: a new LOCAL is absent or whole, an existing one
    holds minbase alone or minbase and web (never part of web), and verifies clean."""
    rng = random.Random(int(os.environ.get("IMAGEFS_KILL_SEED", "18")))
    seed = copy_image(minbase_image, tmp_path / "seed.imagefs")
    old = state(seed)
    env = {**os.environ, **weed.env(), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    into, new = tmp_path / "into.imagefs", tmp_path / "new.imagefs"
    shutil.copyfile(seed, into)
    start = time.monotonic()  # kills spread over one whole pull's time, measured here
    assert cli_zygote.run(["pull", STORE, "web", str(into)], env=env).returncode == 0
    whole = time.monotonic() - start
    web = state(into)[-1]
    outcomes: dict[str, int] = {}
    for i in range(12):
        dest = new if i % 2 else into
        dest.unlink(missing_ok=True)
        if dest == into:
            shutil.copyfile(seed, into)
        proc = cli_zygote.popen(["pull", STORE, "web", str(dest)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=rng.uniform(0.0, whole * 1.2))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err and proc.returncode in (0, -signal.SIGKILL), err
        if dest == new and not new.exists():
            outcome = "new absent"
        else:
            assert "OK" in run_imagefs("verify", dest).stdout.decode()
            now = state(dest)
            before = [] if dest == new else old
            assert now in ((before, before + [web]) if before else (before + [web],)), now
            outcome = f"{'new' if dest == new else 'existing'} " + (
                "whole" if now == before + [web] else "old")
        if proc.returncode == 0:
            assert outcome.endswith("whole"), outcome
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["seed.imagefs", "tmp", "into.imagefs"] + ["new.imagefs"] * new.exists())
    print(f"\n12 kills of pull (whole pull {whole:.2f} s): {outcomes}")
    # A killed pull leaves its folder (the bundle it read) in TMPDIR: cleanup --all clears
    # it, and nothing else there.
    left = [n for n in os.listdir(tmp_path / "tmp") if n.startswith("imagefs-pull-")]
    print(f"left by the kills: {len(left)} folders")
    (tmp_path / "tmp" / "imagefs-pull-1-kept").mkdir()  # pid 1 is alive: not a leftover
    assert run_imagefs("cleanup", "--all", env=env).returncode == 0
    assert os.listdir(tmp_path / "tmp") == ["imagefs-pull-1-kept"]
    assert outcomes.get("new absent", 0) + outcomes.get("existing old", 0) > 0, outcomes


def state(image: Path) -> list[tuple[str, str]]:
    """(name, digest) of every index of image."""
    return [(i["name"], i["digest"])
            for i in json.loads(run_imagefs("info", image, "--json").stdout)["indices"]]


# -- reading straight from the store ------------------------------------------------------

def test_ls_cat_and_apply_read_an_index_straight_from_the_store(pushed: dict, weed: Weed,
                                                                 tmp_path: Path) -> None:
    cache = ["--cache", str(tmp_path / "cache"), "--cache-size", "16M"]
    listing = run_imagefs("ls", STORE, "web", "/etc", *cache, env=weed.env()).stdout
    assert sorted(listing.split()) == sorted(
        os.fsencode(n) for n in os.listdir(fixture_tree("bookworm-web") / "etc"))
    release = run_imagefs("cat", STORE, "web", "/etc/os-release", *cache, env=weed.env())
    assert release.stdout == (fixture_tree("bookworm-web") / "etc/os-release").read_bytes()
    dest = tmp_path / "applied"
    run_imagefs("apply", STORE, "web", dest, *cache, env=weed.env())
    assert rsync_diff(fixture_tree("bookworm-web"), dest) == ""
    assert _cached(tmp_path / "cache") <= 16 << 20


def _cached(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "packs").iterdir())


def test_a_mount_from_the_store_is_exact_and_its_cache_bounded(pushed: dict, weed: Weed,
                                                               tmp_path: Path) -> None:
    """tar reads the whole index (71 MB of packs) through a 24 MiB cache; then a second
    mount with a cache large enough reads it again without fetching a pack it holds."""
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    options = ["--cache", str(cache), "--cache-size", "24M"]
    with mounted(STORE, "web", mnt, *options, env=weed.env()) as rec:
        assert rec["image"] == f"{STORE}/refs/web" and rec["mode"] == "ro"
        tar = subprocess.run(["tar", "-cf", "-", "-C", str(mnt), "."], capture_output=True)
        assert tar.returncode == 0 and len(tar.stdout) > 200 << 20
        assert _cached(cache) <= 24 << 20
        assert rsync_diff(fixture_tree("bookworm-web"), mnt) == ""
    big = ["--cache", str(cache), "--cache-size", "1G"]
    with mounted(STORE, "web", mnt, *big, env=weed.env()):
        _read_all(mnt)
    held = {p.name: p.stat().st_ino for p in (cache / "packs").iterdir()}
    assert sum((cache / "packs" / n).stat().st_size for n in held) > 60 << 20  # every pack
    with mounted(STORE, "web", mnt, *big, env=weed.env()):
        _read_all(mnt)
    again = {p.name: p.stat().st_ino for p in (cache / "packs").iterdir()}
    assert again == held  # every pack read from the cache, none fetched and written again
    out = run_imagefs("mount", "--rw", STORE, "web", mnt, env=weed.env(), check=False)
    assert out.returncode == 2 and b"mounts read-only" in out.stderr


def _read_all(mnt: Path) -> None:
    """Every byte of every file (GNU tar reads nothing when it writes to /dev/null)."""
    subprocess.run(f"tar -cf - -C {mnt} . | cat >/dev/null", shell=True, check=True)


def test_a_damaged_pack_makes_its_files_eio_and_the_mount_serves_the_rest(
        pushed: dict, weed: Weed, tmp_path: Path) -> None:
    """A byte flipped in one of web's own packs in the store: the files with chunks in it
    answer EIO; the others read as captured."""
    s3 = weed.client()
    prefix = STORE.removeprefix("s3://golden/")
    ref = json.loads(s3.get_object(Bucket="golden", Key=f"{prefix}/refs/web")["Body"].read())
    bundle = s3.get_object(Bucket="golden", Key=f"{prefix}/bundles/{ref['bundle']}")["Body"]
    packs = json.loads(_pack_list(bundle.read()))["packs"]
    key = f"{prefix}/packs/{packs[-1][1]}"
    good = s3.get_object(Bucket="golden", Key=key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    s3.put_object(Bucket="golden", Key=key, Body=bytes(bad))
    mnt = tmp_path / "mnt"
    tree = fixture_tree("bookworm-web")
    try:
        with mounted(STORE, "web", mnt, "--cache", str(tmp_path / "cache"),
                     env=weed.env()):
            failed, served = [], 0
            for path in sorted(p for p in tree.rglob("*") if p.is_file()
                               and not p.is_symlink()):
                rel = path.relative_to(tree)
                try:
                    data = (mnt / rel).read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO, (rel, e)
                    failed.append(rel)
                    continue
                assert data == path.read_bytes(), rel
                served += 1
            assert failed and served > 10 * len(failed), (len(failed), served)
    finally:
        s3.put_object(Bucket="golden", Key=key, Body=good)


# -- gc -------------------------------------------------------------------------------------

TOUCH = {"IMAGEFS_STORE_TOUCH_AFTER": "1"}  # pushes touch what they reuse after 1 s: gc may
# then be run with a grace of 2 s


def _objects(weed: Weed, prefix: str, folder: str) -> set[str]:
    s3 = weed.client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="golden",
                                                         Prefix=f"{prefix}/{folder}/")
    return {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}


def test_gc_removes_only_what_no_ref_reaches(weed: Weed, two: Path, tmp_path: Path) -> None:
    url, prefix = "s3://golden/gc", "gc"
    env = {**weed.env(), **TOUCH}
    run_imagefs("push", two, "minbase", url, env=env)
    web = json.loads(run_imagefs("push", two, "web", url, "--json", env=env).stdout)
    own = web["indices"][0]["packs_sent"]
    packs = _objects(weed, prefix, "packs")
    weed.client().delete_object(Bucket="golden", Key=f"{prefix}/refs/web")
    time.sleep(2.1)  # web's bundle and own packs: unreached, older than the grace
    dry = json.loads(run_imagefs("gc", url, "--grace", "2s", "--dry-run", "--json",
                                 env=env).stdout)
    assert dry["removed"] == own + 1 and dry["refs"] == 1, dry  # + web's bundle
    assert _objects(weed, prefix, "packs") == packs
    done = json.loads(run_imagefs("gc", url, "--grace", "2s", "--json", env=env).stdout)
    assert done["objects"] == dry["objects"] and done["kept"] == len(packs) - own + 1
    assert len(_objects(weed, prefix, "packs")) == len(packs) - own
    local = tmp_path / "minbase.imagefs"
    run_imagefs("pull", url, "minbase", local, env=env)
    assert "OK" in run_imagefs("verify", local).stdout.decode()
    out = run_imagefs("gc", url, "--grace", "1s", env=env, check=False)
    assert out.returncode == 2 and b"at least twice" in out.stderr


def test_pushes_of_two_images_and_gc_at_once(weed: Weed, two: Path, minbase_two_image: Path,
                                            tmp_path: Path) -> None:
    """Two processes push an index each, of two images, into one prefix while gc runs in a
    loop; the content they push was pushed before and left unreached (older than gc's
    grace), so gc would remove it but for the pushes touching what they reuse.  Afterwards
    every ref is complete: each index pulls and verifies."""
    url, prefix = "s3://golden/busy", "busy"
    env = {**os.environ, **weed.env(), "IMAGEFS_STORE_TOUCH_AFTER": "3"}
    run_imagefs("push", two, "minbase", url, env=env)
    weed.client().delete_object(Bucket="golden", Key=f"{prefix}/refs/minbase")
    time.sleep(10.5)  # all of minbase's objects: unreached and older than gc's grace (10 s)
    cli = [sys.executable, "-m", "imagefs.cli"]
    pushes = [subprocess.Popen([*cli, "push", str(two), "web", url], env=env,
                               stderr=subprocess.PIPE),
              subprocess.Popen([*cli, "push", str(minbase_two_image), "two", url], env=env,
                               stderr=subprocess.PIPE)]
    removed: list[str] = []
    try:
        while any(p.poll() is None for p in pushes):
            out = run_imagefs("gc", url, "--grace", "10s", "--json", env=env)
            removed += json.loads(out.stdout)["objects"]
        for p in pushes:
            assert p.wait() == 0, p.stderr.read().decode() if p.stderr else ""
    finally:
        for p in pushes:
            if p.poll() is None:
                p.kill()
                p.wait()
    removed += json.loads(run_imagefs("gc", url, "--grace", "10s", "--json",
                                      env=env).stdout)["objects"]
    s3 = weed.client()
    reached = set()
    for name in ("web", "two"):
        ref = json.loads(s3.get_object(Bucket="golden", Key=f"{prefix}/refs/{name}")
                         ["Body"].read())
        bundle = s3.get_object(Bucket="golden", Key=f"{prefix}/bundles/{ref['bundle']}")
        reached |= {f"packs/{p[1]}" for p in
                    json.loads(_pack_list(bundle["Body"].read()))["packs"]}
        reached.add(f"bundles/{ref['bundle']}")
    # gc removed something (minbase's bundle at least); what a ref reaches is all there
    # (a pack gc removed between a push's look and its touch is sent again by the push)
    assert removed
    have = {f"{folder}/{n}" for folder in ("packs", "bundles")
            for n in _objects(weed, prefix, folder)}
    assert reached <= have, sorted(reached - have)
    for name in ("web", "two"):
        local = tmp_path / f"{name}.imagefs"
        run_imagefs("pull", url, name, local, env=env)
        assert "OK" in run_imagefs("verify", local).stdout.decode()


# -- the daemon ---------------------------------------------------------------------------

def test_the_daemon_pushes_pulls_and_mounts_with_its_own_credentials(
        pushed: dict, weed: Weed, two: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """store.push and store.pull are jobs with progress; mounts.open mounts an index of a
    store.  The daemon's environment holds the store's credentials and endpoint."""
    from daemon_helpers import daemon_process

    from daemon.client import Client

    for name, value in weed.env().items():
        monkeypatch.setenv(name, value)
    url = STORE  # pushed already: the daemon's push finds every object there
    site = tmp_path / "site.imagefs"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with daemon_process(tmp_path) as d, Client(str(d.sock), timeout=300) as c:
        job = c.call("store.push", image=str(two), index=["web"], store=url)
        done = c.call("jobs.wait", job=job["job"])
        assert done["state"] == "done", done
        pushed_web = done["result"]["indices"][0]
        assert pushed_web["name"] == "web" and pushed_web["packs_sent"] == 0
        assert done["progress"]["done"] == done["progress"]["total"] > 0
        job = c.call("store.pull", store=url, index="web", dest=str(site))
        done = c.call("jobs.wait", job=job["job"])
        assert done["state"] == "done" and done["result"]["indices"] == [1], done
        assert "OK" in run_imagefs("verify", site).stdout.decode()
        rec = c.call("mounts.open", image=url, index="web", mountpoint=str(mnt),
                     cache=str(tmp_path / "cache"))
        try:
            assert rec["image"] == f"{url}/refs/web"
            assert sorted(os.listdir(mnt)) == sorted(os.listdir(fixture_tree("bookworm-web")))
            assert (mnt / "etc/os-release").read_bytes() == \
                (fixture_tree("bookworm-web") / "etc/os-release").read_bytes()
        finally:
            unmount_hard(mnt, rec["pid"])


def test_a_volume_server_killed_during_a_pull_and_a_mount(two: Path, tmp_path: Path) -> None:
    """A two-volume-server cluster, every volume replicated on both (001): one volume
    server is killed while a pull and a mount's tar read; both complete from the replica,
    exact."""
    from store_helpers import weed_cluster

    with weed_cluster(tmp_path / "cluster") as c:
        env = {**os.environ, **c.env()}
        url = "s3://golden/cluster"
        run_imagefs("push", two, "all", url, env=c.env())
        pulled, mnt = tmp_path / "pulled.imagefs", tmp_path / "mnt"
        with mounted(url, "web", mnt, "--cache", str(tmp_path / "cache"), "--cache-size",
                     "16M", env=c.env()):
            pull = subprocess.Popen([sys.executable, "-m", "imagefs.cli", "pull", url, "all",
                                     str(pulled)], env=env, stderr=subprocess.PIPE)
            tar = subprocess.Popen(f"tar -cf - -C {mnt} . | cat >/dev/null", shell=True,
                                   stderr=subprocess.PIPE)
            time.sleep(0.5)
            c.kill("volume2")
            assert pull.wait(300) == 0, pull.stderr.read().decode() if pull.stderr else ""
            assert tar.wait(300) == 0, tar.stderr.read().decode() if tar.stderr else ""
            assert rsync_diff(fixture_tree("bookworm-web"), mnt) == ""
        assert "OK" in run_imagefs("verify", pulled).stdout.decode()


def test_a_pack_gc_removes_right_after_a_push_touched_it_is_sent_again(
        weed: Weed, two: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """push._confirm: gc looks at an old object (_still_old), a push touches it, gc deletes
    it; the push, which took it for there, HEADs what it touched once more before its ref
    and sends what is gone, so its ref never names a missing object.  The gc is played by a
    touch that deletes one object in eight right after touching it."""
    from imagefs.store.client import Store
    from imagefs.store.push import push

    url, prefix = "s3://golden/touched", "touched"
    for name, value in {**weed.env(), **TOUCH}.items():
        monkeypatch.setenv(name, value)
    push(str(two), "minbase", url)
    weed.client().delete_object(Bucket="golden", Key=f"{prefix}/refs/minbase")
    time.sleep(1.1)  # older than TOUCH_AFTER: the next push touches what it reuses
    real = Store.touch
    gone: list[str] = []
    touched: list[str] = []

    def touched_then_collected(self: Store, key: str) -> None:
        # One in eight: SeaweedFS answered InternalError three times running to a PUT
        # right after it deleted that key, in one clean-clone run of 187 deleted at once.
        real(self, key)
        touched.append(key)
        if len(touched) % 8 == 1:
            self.delete(key)
            gone.append(key)

    monkeypatch.setattr(Store, "touch", touched_then_collected)
    (again,) = push(str(two), "minbase", url)
    assert gone and again.packs_sent == len([k for k in gone if "/packs/" in k])
    monkeypatch.undo()
    ref = json.loads(weed.client().get_object(
        Bucket="golden", Key=f"{prefix}/refs/minbase")["Body"].read())
    bundle = weed.client().get_object(Bucket="golden", Key=f"{prefix}/bundles/{ref['bundle']}")
    listed = {p[1] for p in json.loads(_pack_list(bundle["Body"].read()))["packs"]}
    assert listed <= _objects(weed, prefix, "packs")
    local = tmp_path / "minbase.imagefs"
    run_imagefs("pull", url, "minbase", local, env={**os.environ, **weed.env()})
    assert "OK" in run_imagefs("verify", local).stdout.decode()
