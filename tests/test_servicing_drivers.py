"""Drivers (issue 15): kernel modules and firmware matched to hardware, on Debian 12's cloud
kernel and the driver fixtures (../shared/fixtures/drivers, its README has the results).

Oracles: kmod's own tools on the host (modinfo -F, modprobe --dump-modversions, modprobe
-d MNT -S KVER -R MODALIAS and --show-depends, modinfo -b MNT -k KVER -F filename), glibc's
fnmatch (through ctypes) for the alias globs, the README's coverage tables, rsync between
a mount of the image before and after, the files of /sys, and `imagefs verify`.

The image (tests/drivers_helpers.kernel_image: bookworm-minbase with the kernel) is made
once per test process and copied for each test that changes it."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted, mounted_rw, rsync_diff, run_imagefs, servicing_leftovers
from drivers_helpers import (
    HARDWARE,
    INVENTORIES,
    KVER,
    NEEDS_KERNEL,
    REPOSITORY,
    UPDATES,
    WRONG,
    craft_module,
    image_copy,
    kernel_files,
    kernel_image,
    kill_at_random,
    kmod,
    modprobe_resolve,
    one_error_line,
    readme_tables,
    sha,
)

from imagefs.errors import NoSuchPath
from imagefs.image import Image
from servicing.driver_match import compile_glob
from servicing.driver_modinfo import read_module
from servicing.roots import IndexRoot

pytestmark = [NEEDS_KERNEL]
NUC = HARDWARE / "nuc-13-pro.json"
ALL_HARDWARE = [HARDWARE / f"{n}.json" for n in INVENTORIES]
NUC_MODULES = ["ifs_demo_nic", "ifs_demo_core", "ifs_demo_wifi"]
FIRMWARE = {"ifs-demo/nic-fw-1.bin": REPOSITORY / "Intel/NUC-13-Pro/firmware/ifs-demo/nic-fw-1.bin",
            "ifs-demo/wifi-ucode-72.bin":
            REPOSITORY / "Intel/NUC-13-Pro/firmware/ifs-demo/wifi-ucode-72.bin"}


def driver(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return run_imagefs("driver", *args, "--no-daemon", check=check)


def coverage(image: Path, *hardware: Path, repository: bool = False) -> dict:
    proc = driver("check", image, "1", "--hardware", *hardware, "--json",
                  *(["--repository", str(REPOSITORY)] if repository else []), check=False)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] == (proc.returncode == 0)
    return doc


def columns(doc: dict, inventory: int = 0) -> list[tuple[str, list[str], list[str]]]:
    devices = doc["inventories"][inventory]["kernels"][0]["devices"]
    return [(d["modalias"], [m["name"] for m in d["modules"]], d["with_repository"])
            for d in devices]


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    yield image_copy(tmp_path)
    assert servicing_leftovers() == []


def test_module_metadata_is_what_modinfo_says(tmp_path: Path) -> None:
    """Every fixture module, plain and compressed (.ko.xz, .ko.zst): the fields modinfo -F
    prints and the symbol versions modprobe --dump-modversions prints."""
    for ko in sorted(Path(REPOSITORY).rglob("*.ko")) + [WRONG]:
        for packed in (ko, _compressed(ko, tmp_path, "xz"), _compressed(ko, tmp_path, "zstd")):
            info = read_module(packed.read_bytes(), str(packed))
            for field, got in (("vermagic", [info.vermagic]), ("alias", info.aliases),
                               ("firmware", info.firmware), ("name", [info.name]),
                               ("depends", [",".join(info.depends)])):
                assert kmod("modinfo", "-F", field, str(packed)).split("\n")[:-1] == got
            dump = kmod("modprobe", "--dump-modversions", str(packed))
            assert {s: c for c, s in (ln.split("\t") for ln in dump.splitlines())} == {
                s: f"0x{c:08x}" for s, c in info.versions.items()}
            assert info.compression == {".ko": "", ".xz": "xz", ".zst": "zst"}[packed.suffix]


def _compressed(ko: Path, where: Path, tool: str) -> Path:
    suffix = {"xz": ".xz", "zstd": ".zst"}[tool]
    out = where / f"{ko.parent.name}-{ko.name}{suffix}"
    with open(out, "wb") as fh:
        subprocess.run([tool, "-c", str(ko)], stdout=fh, check=True)
    return out


def test_alias_globs_match_as_glibc_fnmatch() -> None:
    """The alias matcher against glibc's fnmatch(pattern, key, 0) on random patterns of
    globs, brackets, ranges and escapes (closed brackets, no character classes: what
    modules.alias can hold)."""
    libc = ctypes.CDLL(None)
    libc.fnmatch.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    rng = random.Random(15)
    pieces = [*"ab-*?[]!^\\:1", "a-", "-]", "[!", "[a-b]", "[0-9A-F]"]
    tried = 0
    while tried < 12000:
        pattern = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        last = pattern.rfind("[")
        if (last >= 0 and "]" not in pattern[last + 2:]) or any(
                c in pattern for c in ("[:", "[=", "[.")):
            continue
        tried += 1
        key = "".join(rng.choice("ab-]:\\[!^1F") for _ in range(rng.randint(0, 9)))
        want = libc.fnmatch(pattern.encode(), key.encode(), 0) == 0
        assert compile_glob(pattern).match(key) == want, (pattern, key)


def test_check_reproduces_the_readme_coverage(tmp_path: Path) -> None:
    """driver check on each inventory: the README's table, both columns; each modalias
    what modprobe -R says in a mount of the index; exit 1 (NUC and Latitude have gaps)."""
    image = kernel_image()
    before = sha(image)
    doc = coverage(image, *ALL_HARDWARE, repository=True)
    assert not doc["ok"]
    tables = readme_tables()
    for n, name in enumerate(INVENTORIES):
        assert columns(doc, n) == tables[name], name
    # "NUC 4 of 7 resolve with the repository (2 without), Latitude 4 of 8 (2 without),
    # QEMU 9 of 9 with the kernel alone."
    counts = [(k["covered"], k["covered_with_repository"], k["total"])
              for i in doc["inventories"] for k in i["kernels"]]
    assert counts == [(2, 4, 7), (2, 4, 8), (9, 9, 9)]
    assert coverage(image, HARDWARE / "qemu-vm.json")["ok"]
    with mounted(image, "1", tmp_path / "ro") as rec:
        for n, _name in enumerate(INVENTORIES):
            for alias, alone, _with in columns(doc, n):
                assert modprobe_resolve(rec["mountpoint"], alias) == alone, alias
    text = driver("check", image, "1", "--hardware", NUC, "--repository", REPOSITORY,
                  check=False)
    assert text.returncode == 1
    out = text.stdout.decode()
    assert "2 of 7 devices have a driver in the index; the repository covers 2 more" in out
    assert "ifs_demo_wifi (Intel/NUC-13-Pro/ifs_demo_wifi.ko)" in out
    assert sha(image) == before


def test_add_for_the_nuc_then_remove(image: Path, tmp_path: Path) -> None:
    """driver add --hardware nuc-13-pro.json: the NIC and Wi-Fi modules with their
    dependency and firmware, as modprobe, modinfo and the README see them; then driver
    remove: check as before, and the tree as before but for times."""
    before = sha(image)
    plan = driver("add", image, "1", "--repository", REPOSITORY, "--hardware", NUC,
                  "--dry-run", "--json")
    assert sha(image) == before
    planned = json.loads(plan.stdout)["indices"][0]["plan"]
    assert [m["name"] for m in planned["modules"]] == NUC_MODULES
    assert {f["name"]: f["action"] for f in planned["firmware"]} == dict.fromkeys(FIRMWARE,
                                                                                  "add")
    driver("add", image, "1", "--repository", REPOSITORY, "--hardware", NUC)
    history = json.loads(run_imagefs("info", image, "--json", "--history").stdout)
    assert history["indices"][0]["history"][-1]["action"] == "driver add"
    _oracles_after_add(image, tmp_path / "after")
    tables = readme_tables()["nuc-13-pro"]
    assert columns(coverage(image, NUC)) == [(a, w, w) for a, _k, w in tables]
    listed = json.loads(driver("list", image, "1", "--json").stdout)["drivers"]
    assert sorted(d["name"] for d in listed) == sorted(NUC_MODULES)
    assert {d["folder"] for d in listed} == {"Intel/NUC-13-Pro"}
    assert all(d["added_by_imagefs"] and all(f["found"] for f in d["firmware"])
               for d in listed)
    added = sha(image)
    again = driver("add", image, "1", "--repository", REPOSITORY, "--hardware", NUC)
    assert b"Nothing changed." in again.stdout and sha(image) == added
    refused = driver("remove", image, "1", "ifs_demo_core", check=False)
    assert refused.returncode == 2 and "needed by ifs_demo_wifi" in one_error_line(refused)
    driver("remove", image, "1", *NUC_MODULES)
    assert columns(coverage(image, NUC)) == [(a, k, k) for a, k, _w in tables]
    assert json.loads(driver("list", image, "1", "--json").stdout)["drivers"] == []
    with mounted(kernel_image(), "1", tmp_path / "old") as old, \
            mounted(image, "1", tmp_path / "new") as new:
        for part in (f"usr/lib/modules/{KVER}", "var/lib"):  # what add and remove touch
            assert rsync_diff(f"{old['mountpoint']}/{part}", f"{new['mountpoint']}/{part}",
                              ns=False, extra=["--no-times", "--omit-dir-times",
                                               "--exclude=/kernel/"]) == ""
        assert not os.path.lexists(f"{new['mountpoint']}/usr/lib/firmware")


def _oracles_after_add(image: Path, mnt: Path) -> None:
    with mounted(image, "1", mnt) as rec:
        root = rec["mountpoint"]
        assert modprobe_resolve(
            root, "pci:v00008086d000015FBsv00001028sd00000B0Fbc02sc00i00") == ["ifs_demo_nic"]
        deps = kmod("modprobe", "-d", root, "-S", KVER, "--show-depends", "ifs_demo_wifi")
        assert deps.split("\n")[:-1] == [
            f"insmod {root}{UPDATES}/ifs_demo_core.ko ",
            f"insmod {root}{UPDATES}/ifs_demo_wifi.ko "]
        for name in NUC_MODULES:
            found = kmod("modinfo", "-b", root, "-k", KVER, "-F", "filename", name)
            assert found.strip() == f"{root}{UPDATES}/{name}.ko"
            assert sha(f"{root}{UPDATES}/{name}.ko") == sha(
                REPOSITORY / "Intel/NUC-13-Pro" / f"{name}.ko")
        dep = Path(f"{root}/lib/modules/{KVER}/modules.dep").read_text()
        assert ("updates/imagefs/ifs_demo_wifi.ko: updates/imagefs/ifs_demo_core.ko\n"
                in dep)
        for name, src in FIRMWARE.items():
            assert sha(f"{root}/lib/firmware/{name}") == sha(src)
        for alias, _alone, with_repository in readme_tables()["nuc-13-pro"]:
            assert modprobe_resolve(root, alias) == with_repository, alias


def test_a_module_for_another_kernel_is_refused(image: Path, tmp_path: Path) -> None:
    """The wrong-kernel build (vermagic 6.1.0-57-amd64), a module with the cloud
    kernel's vermagic but the generic build's symbol versions, and one for another
    machine: each refused with one line naming why; the image unchanged."""
    before = sha(image)
    proc = driver("add", image, "1", "--path", WRONG, check=False)
    line = one_error_line(proc)
    assert proc.returncode == 2 and "6.1.0-57-amd64" in line and KVER in line
    crcs = tmp_path / "crcs.ko"
    crcs.write_bytes(craft_module("ifs_demo_nic", versions={"module_layout": 0x9060323F}))
    proc = driver("add", image, "1", "--path", crcs, check=False)
    assert proc.returncode == 2
    assert "disagrees about the version of symbol module_layout" in one_error_line(proc)
    arm = tmp_path / "arm.ko"
    arm.write_bytes(craft_module("ifs_demo_arm", machine=183))
    proc = driver("add", image, "1", "--path", arm, check=False)
    assert proc.returncode == 2 and "EM_AARCH64" in one_error_line(proc)
    assert sha(image) == before


def test_what_each_way_of_choosing_takes(image: Path) -> None:
    """--model takes the folder and Generic/, --all everything once, --path a folder's
    modules with its firmware/; --path of the Wi-Fi module alone lacks its dependency;
    an inventory the kernel covers alone gets nothing (and nothing changes)."""
    def planned(*args: str | Path) -> list[str]:
        out = driver("add", image, "1", *args, "--dry-run", "--json")
        return [m["name"] for m in json.loads(out.stdout)["indices"][0]["plan"]["modules"]]

    repo = ["--repository", str(REPOSITORY)]
    assert sorted(planned(*repo, "--model", "Dell/Latitude-5540")) == [
        "ifs_demo_nic", "ifs_demo_usb"]
    assert sorted(planned(*repo, "--all")) == sorted([*NUC_MODULES, "ifs_demo_usb"])
    assert sorted(planned("--path", REPOSITORY / "Intel/NUC-13-Pro")) == sorted(NUC_MODULES)
    proc = driver("add", image, "1", "--path", REPOSITORY / "Intel/NUC-13-Pro/ifs_demo_wifi.ko",
                  check=False)
    assert proc.returncode == 2 and "needs module ifs_demo_core" in one_error_line(proc)
    before = sha(image)
    qemu = driver("add", image, "1", *repo, "--hardware", HARDWARE / "qemu-vm.json")
    assert b"no module of the repository matches" in qemu.stdout
    assert b"Nothing changed." in qemu.stdout and sha(image) == before


def _bad_inputs(tmp: Path) -> list[tuple[list[str | Path], int, str]]:
    """(driver arguments after IMAGE 1, exit code, what the one line says)."""
    def hw(name: str, data: str | bytes) -> Path:
        path = tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def ko(name: str, data: bytes) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path

    def repo(name: str, modules: dict[str, bytes]) -> Path:
        root = tmp / name / "Vendor" / "Model"
        root.mkdir(parents=True)
        for fn, data in modules.items():
            (root / fn).write_bytes(data)
        return tmp / name

    outside = repo("outside", {})
    (outside / "Vendor/Model/x.ko").symlink_to("/etc/passwd")
    fifo = tmp / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "x.ko")
    real = (REPOSITORY / "Intel/NUC-13-Pro/ifs_demo_nic.ko").read_bytes()
    no_info = craft_module("x").replace(b".modinfo", b".modinfX")
    check = ["check", "--hardware"]
    return [
        ([*check, hw("a.json", "{not json")], 2, "not JSON"),
        ([*check, hw("b.json", "[1, 2]")], 2, "not a hardware inventory"),
        ([*check, hw("c.json", '{"dmi": {}}')], 2, "no modaliases"),
        ([*check, hw("d.json", '{"modaliases": [1]}')], 2, "is not a string"),
        ([*check, hw("e.json", '{"modaliases": ["pci:v*"]}')], 2, "glob character"),
        ([*check, hw("f.json", '{"modaliases": ["pci:\\u0001"]}')], 2, "not a modalias"),
        ([*check, hw("g.json", b" " * (5 << 20))], 2, "over 4 MiB"),
        ([*check, tmp / "none.json"], 3, "no such hardware inventory"),
        (["add", "--path", ko("n.ko", b"hello")], 2, "not an ELF file"),
        (["add", "--path", ko("t.ko", real[:3000])], 2, "truncated"),
        (["add", "--path", ko("i.ko", no_info)], 2, "no .modinfo section"),
        (["add", "--path", ko("fw.ko", craft_module("fw", firmware=("../../etc/shadow",)))],
         2, "not a path under lib/firmware"),
        (["add", "--path", fifo], 2, "not a regular file"),
        (["add", "--repository", repo("loop", {"a.ko": craft_module("loop_a", depends=(
            "loop_b",)), "b.ko": craft_module("loop_b", depends=("loop_a",))}), "--all"],
         2, "in a loop"),
        (["add", "--repository", repo("lack", {"a.ko": craft_module("lack_a", depends=(
            "nosuch",))}), "--all"], 2, "needs module nosuch"),
        (["add", "--repository", outside, "--all"], 2, "outside the repository"),
        (["add", "--repository", REPOSITORY, "--model", "Nope/Model"], 2, "no model folder"),
        (["add", "--repository", REPOSITORY], 2, "give one of --hardware"),
        (["add", "--hardware", NUC], 2, "give --repository"),
        (["add", "--repository", REPOSITORY, "--hardware", NUC, "--initramfs"], 2,
         "no update-initramfs"),
        (["remove", "button"], 2, "part of kernel"),
        (["remove", "nosuch"], 2, "no added driver nosuch"),
        (["remove", "../x"], 2, "not a module name"),
    ]


def test_bad_input_is_one_line_and_changes_nothing(image: Path, tmp_path: Path) -> None:
    """Each refused with one line and its exit code (the CLI's main() in this process: no
    traceback gets past it), the image byte for byte as it was."""
    from imagefs.cli import main

    before = sha(image)
    for args, code, said in _bad_inputs(tmp_path):
        argv = ["driver", str(args[0]), str(image), "1", *map(str, args[1:]), "--no-daemon"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            got = main(argv)
        lines = err.getvalue().splitlines()
        assert got == code and len(lines) == 1, (args, err.getvalue())
        assert lines[0].startswith("imagefs: ") and said in lines[0], (args, lines)
    assert sha(image) == before


def test_inventory_of_a_machine(tmp_path: Path) -> None:
    """driver inventory: DMI and every device's modalias from /sys (a crafted one, and
    this machine's, against its files); what it writes, driver check reads."""
    sys_root = tmp_path / "sys"
    (sys_root / "class/dmi/id").mkdir(parents=True)
    (sys_root / "class/dmi/id/sys_vendor").write_text("Dell Inc.\n")
    (sys_root / "class/dmi/id/product_name").write_text("Latitude 5540\n")
    for n, alias in enumerate(["pci:v00008086d000015FBsv00001028sd00000B0Fbc02sc00i00",
                               "acpi:LNXPWRBN:", "acpi:LNXPWRBN:", "bad alias"]):
        dev = sys_root / f"bus/b{n}/devices/d{n}"
        dev.mkdir(parents=True)
        (dev / "modalias").write_text(alias + "\n")
    out = tmp_path / "inv.json"
    proc = run_imagefs("driver", "inventory", "--sys", sys_root, "--output", out)
    assert b"left out" in proc.stderr
    assert json.loads(out.read_text()) == {
        "dmi": {"sys_vendor": "Dell Inc.", "product_name": "Latitude 5540", "board_name": ""},
        "modaliases": ["acpi:LNXPWRBN:",
                       "pci:v00008086d000015FBsv00001028sd00000B0Fbc02sc00i00"]}
    doc = coverage(kernel_image(), out)
    assert [n for _a, n, _w in columns(doc)] == [["button"], []]
    mine = json.loads(run_imagefs("driver", "inventory").stdout)
    files = subprocess.run("cat /sys/bus/*/devices/*/modalias", shell=True,
                           capture_output=True, text=True).stdout.split()
    assert mine["modaliases"] == sorted(set(files))


def test_list_all_has_every_module(tmp_path: Path) -> None:
    image = kernel_image()
    doc = json.loads(driver("list", image, "1", "--all", "--json").stdout)
    dep = run_imagefs("cat", image, "1", f"/lib/modules/{KVER}/modules.dep").stdout
    assert len(doc["drivers"]) == len(dep.splitlines()) > 1000
    button = next(d for d in doc["drivers"] if d["name"] == "button")
    assert button["where"] == "in-tree"
    with mounted(image, "1", tmp_path / "ro") as rec:
        said = kmod("modinfo", "-F", "alias", f"{rec['mountpoint']}{button['path']}")
    assert button["aliases"] == said.split("\n")[:-1]


def test_in_a_writable_mount(image: Path, tmp_path: Path) -> None:
    """--mount MNT: added in the caller's session, listed from it; the commit is theirs.
    The module given is zstd-compressed: it goes in decompressed, as the .ko it was.  A
    damaged record of added drivers is an error (exit 4), never obeyed."""
    usb = REPOSITORY / "Generic/usb-ethernet/ifs_demo_usb.ko"
    packed = _compressed(usb, tmp_path, "zstd")
    before = sha(image)
    with mounted_rw(image, "1", tmp_path / "rw") as rec:
        mnt = rec["mountpoint"]
        driver("add", "--mount", mnt, "--path", packed)
        listed = json.loads(driver("list", "--mount", mnt, "--json").stdout)["drivers"]
        assert [d["name"] for d in listed] == ["ifs_demo_usb"]
        assert modprobe_resolve(mnt, "usb:v0BDAp8153d3000dc00dsc00dp00icFFiscFFip00in00") == [
            "ifs_demo_usb"]
        assert sha(f"{mnt}{UPDATES}/ifs_demo_usb.ko") == sha(usb)
        record = Path(f"{mnt}/var/lib/imagefs/drivers.json")
        record.write_text('{"format": 1, "modules": [{"name": "../x"}], "firmware": []}')
        for verb in ("list", "remove"):
            proc = driver(verb, "--mount", mnt, *(["x"] if verb == "remove" else []),
                          check=False)
            assert proc.returncode == 4 and "drivers.json is damaged" in one_error_line(proc)
    assert sha(image) == before


def test_a_kernel_depmod_never_indexed(tmp_path: Path) -> None:
    """A kernel's files without modules.dep (dpkg-deb -x, no postinst): modprobe finds
    nothing, and neither does driver check, which says why."""
    root = tmp_path / "root"
    shutil.copytree(kernel_files() / "boot", root / "boot")
    (root / f"lib/modules/{KVER}/kernel").mkdir(parents=True)
    doc = json.loads(driver("check", "--mount", root, "--hardware", HARDWARE / "qemu-vm.json",
                            "--json", check=False).stdout)
    k = doc["inventories"][0]["kernels"][0]
    assert k["covered"] == 0 and "depmod never ran" in k["notes"][0]


def added_state(image: Path) -> str:
    """'new' when the NUC's NIC module is added (its file, depmod's modules.dep and the
    record agree), 'old' when none of them has it; fails on anything in between."""
    with Image.open(str(image)) as img:
        view = img.view("1")
        found = []
        for path in (f"{UPDATES}/ifs_demo_nic.ko", "/var/lib/imagefs/drivers.json"):
            try:
                view.lookup(path)
                found.append(True)
            except NoSuchPath:
                found.append(False)
        dep = IndexRoot(view).read(f"/lib/modules/{KVER}/modules.dep") or b""
    found.append(b"updates/imagefs/ifs_demo_nic.ko" in dep)
    assert len(set(found)) == 1, found
    return "new" if found[0] else "old"


def _kills(image: Path, rounds: int, seed: int, remove_rounds: int) -> None:
    pristine = image.with_name("pristine.imagefs")
    added = image.with_name("added.imagefs")
    shutil.copyfile(image, pristine)
    add = ["driver", "add", str(image), "1", "--repository", str(REPOSITORY), "--hardware",
           str(NUC)]
    seen = kill_at_random(image, add, added_state, rounds, seed, pristine, added)
    assert sum(seen.values()) == rounds
    remove = ["driver", "remove", str(image), "1", *NUC_MODULES]

    def removed(img: Path) -> str:
        return {"new": "old", "old": "new"}[added_state(img)]

    seen_rm = kill_at_random(image, remove, removed, remove_rounds, seed + 1, added)
    assert sum(seen_rm.values()) == remove_rounds
    print(f"kills of add: {seen}; of remove: {seen_rm}")


def test_sigkill_at_random_moments(image: Path) -> None:
    """driver add killed at 3 random moments, driver remove at 2: after imagefs cleanup
    the image verifies and is wholly old or wholly new, nothing is left behind."""
    _kills(image, 3, 15, 2)


@pytest.mark.slow
def test_sigkill_at_random_moments_50(image: Path) -> None:
    _kills(image, 50, 1515, 50)

