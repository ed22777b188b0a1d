"""What the feature tests share (the minbase image they copy is conftest's minbase_image,
captured once per session): a crafted root whose unit directories hold every unit-file
state systemctl knows, the oracles (the host's `systemctl --root` on a directory or a
mount), a repacked chrony (an upgrade), and a SIGKILL loop for feature verbs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cli_zygote
from conftest import run_imagefs, settled_after_a_kill
from servicing_helpers import DEBS

CHRONY = DEBS / "chrony_4.3-2+deb12u3_amd64.deb"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
       "SYSTEMCTL_SKIP_SYSV": "1"}


def systemctl(root: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's `systemctl --root=root ARGS` (the oracle)."""
    return subprocess.run(["systemctl", f"--root={root}", "--no-pager", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


def oracle_list(root: Path | str) -> list[dict[str, str | None]]:
    """`systemctl --root=root list-unit-files --output=json`, as feature list shows it."""
    out = systemctl(root, "list-unit-files", "--output=json")
    return [{"unit": r["unit_file"], "state": r["state"], "preset": r["preset"]}
            for r in json.loads(out.stdout)]


def is_enabled(root: Path | str, *units: str) -> dict[str, str]:
    """`systemctl --root=root is-enabled UNIT` of each unit."""
    return {u: systemctl(root, "is-enabled", u).stdout.strip() for u in units}


def feature_list(*args: str | Path) -> list[dict[str, str | None]]:
    doc = json.loads(run_imagefs("feature", "list", *args, "--json", "--no-daemon").stdout)
    return doc["units"]


SERVICE = "[Unit]\nDescription={0}\n[Service]\nExecStart=/bin/true\n"


def crafted_root(root: Path) -> Path:
    """A root whose unit directories hold every state list-unit-files reports (enabled,
    disabled, static, masked, masked-runtime, alias, indirect, generated, transient,
    enabled-runtime, linked, bad) and hostile links (loops, escapes, dangling)."""
    lib = root / "usr/lib/systemd/system"
    etc = root / "etc/systemd/system"
    for d in (lib, etc / "multi-user.target.wants", root / "run/systemd/system",
              root / "run/systemd/generator", root / "run/systemd/transient",
              root / "usr/local/lib/systemd/system", root / "srv/units",
              root / "usr/lib/systemd/system-preset", root / "opt",
              root / "run/systemd/system/multi-user.target.wants"):
        d.mkdir(parents=True, exist_ok=True)
    (root / "lib").symlink_to("usr/lib")
    install = "[Install]\nWantedBy=multi-user.target\n"
    units = {
        "on.service": SERVICE + install + "Alias=on-alias.service\n",
        "off.service": SERVICE + install,
        "static.service": SERVICE,
        "ind.service": SERVICE + "[Install]\nAlso=off.service\n",
        "tmpl@.service": SERVICE + install + "DefaultInstance=one\n",
        "tmpl2@.service": SERVICE + install,
        "masked.service": SERVICE + install,
        "rt.service": SERVICE + install,
        "mrt.service": SERVICE + install,
        "multi-user.target": "[Unit]\nDescription=multi user\n",
        "tick.timer": "[Timer]\nOnCalendar=daily\n[Install]\nWantedBy=timers.target\n",
        "bad.service": "[Install\nWantedBy=\x00\n",
    }
    for name, text in units.items():
        (lib / name).write_text(text.format(name))
    (lib / "bad.service.d").mkdir()
    (lib / "on.service.d").mkdir()
    (lib / "on.service.d/override.conf").write_text("[Service]\nNice=5\n")
    (lib / "vendor-masked.service").symlink_to("/dev/null")
    (root / "usr/local/lib/systemd/system/local.service").write_text(SERVICE + install)
    (etc / "multi-user.target.wants/on.service").symlink_to("/lib/systemd/system/on.service")
    (etc / "on-alias.service").symlink_to("/lib/systemd/system/on.service")
    (etc / "multi-user.target.wants/tmpl@one.service").symlink_to(
        "/lib/systemd/system/tmpl@.service")
    (etc / "masked.service").symlink_to("/dev/null")
    (root / "run/systemd/system/mrt.service").symlink_to("/dev/null")
    (root / "run/systemd/system/multi-user.target.wants/rt.service").symlink_to(
        "/usr/lib/systemd/system/rt.service")
    (root / "run/systemd/generator/gen.service").write_text(SERVICE)
    (root / "run/systemd/transient/tr.service").write_text(SERVICE)
    (root / "srv/units/linked.service").write_text(SERVICE + install)
    (root / "opt/units").symlink_to("../srv/units")  # a linked unit's path has a symlink
    (etc / "linked.service").symlink_to("/opt/units/linked.service")
    (etc / "loop1.service").symlink_to("loop2.service")
    (etc / "loop2.service").symlink_to("loop1.service")
    (etc / "dangling.service").symlink_to("/nowhere/dangling.service")
    (etc / "escape.service").symlink_to("../../../../../../../../etc/escape-target.service")
    (root / "etc/escape-target.service").write_text(SERVICE + install)
    (etc / "host.service").symlink_to("/root/host.service")  # the image's /root, not ours
    (root / "usr/lib/systemd/system-preset/90-test.preset").write_text(
        "disable off.service\nenable *\n")
    return root


def repacked(deb: Path, where: Path, suffix: str) -> Path:
    """deb with its version raised by suffix (an upgrade of the same content)."""
    tree = where / f"repack-{suffix}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    lines = control.read_text().splitlines()
    version = next(ln.split(": ", 1)[1] for ln in lines if ln.startswith("Version: "))
    control.write_text("\n".join(f"Version: {version}{suffix}" if ln.startswith("Version: ")
                                 else ln for ln in lines) + "\n")
    out = where / f"{deb.name.split('_')[0]}_{version}{suffix}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return out


def kill_at_random(argv: list[str], image: Path, pristine: Path, rounds: int, seed: int,
                   state: Callable[[], str], cleaned_up: Callable[[], None],
                   leftovers: Callable[[], list[str]]) -> dict[str, int]:
    """SIGKILL the verb argv at moments spread over its whole run, `rounds` times; after
    cleaned_up() nothing is left (leftovers() == []), the image verifies clean and state()
    says 'old' or 'new' (it fails on anything in between).  The image is put back to
    pristine after each 'new'."""
    from imagefs.verify import verify

    rng = random.Random(seed)
    seen = {"old": 0, "new": 0}
    assert argv[:3] == [sys.executable, "-m", "imagefs.cli"], argv  # cli(): the zygote's
    args = argv[3:]
    start = time.monotonic()
    done = cli_zygote.run(args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    whole = time.monotonic() - start
    shutil.copyfile(pristine, image)
    for _ in range(rounds):
        proc = cli_zygote.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Past the end too: the commit is the last tenth of a feature verb's run, and a
        # loaded machine runs it slower than the measured run.
        time.sleep(rng.uniform(0.0, whole * 1.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        settled_after_a_kill()
        cleaned_up()
        assert leftovers() == []
        assert verify(str(image)).ok
        now = state()
        seen[now] += 1
        if now == "new":
            shutil.copyfile(pristine, image)
    return seen


def cli(*args: str | Path) -> list[str]:
    """argv of the CLI in a child process (for the kill tests)."""
    return [sys.executable, "-m", "imagefs.cli", *map(str, args), "--no-daemon"]


def sha_tree_entry(path: Path) -> str:
    """What is at path (for before/after comparisons): a link's target, a file's bytes."""
    if path.is_symlink():
        return "-> " + os.readlink(path)
    return path.read_text() if path.exists() else "(none)"
