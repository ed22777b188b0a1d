"""imagefs driver inventory | check | add | list | remove: kernel modules and firmware of an
index matched to hardware (MDT's Out-of-Box Drivers; DISM /Add-Driver, /Get-Drivers,
/Remove-Driver).  The work is servicing.driver_*'s; this module reads the arguments, goes
through the daemon when one listens, and shows the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from imagefs.errors import UsageError, one_line

from ._common import print_json
from ._daemon import absolute, call, daemon_client
from ._servicing import add_target, run_change, split_target

FMT = argparse.RawDescriptionHelpFormatter
REPO = "/srv/drivers"
DESCRIPTION = """\
Kernel modules and firmware of an index, matched to the hardware of the machines it will
run on. A machine's inventory (`driver inventory`, run on it) lists its devices'
modaliases; `driver check` says, for each kernel of the index, which module would drive
each device (what `modprobe -R MODALIAS` names in the image) and whether the firmware
that module needs is there; `driver add` installs modules from a driver repository
under lib/modules/KVER/updates/imagefs/ with their firmware and runs the image's own
depmod (a servicing transaction); `driver list` and `driver remove` show and take out
what was added.

A driver repository is a folder by hardware model, as MDT's Out-of-Box Drivers:
  REPOSITORY/VENDOR/MODEL/*.ko        modules for that model (also .ko.xz, .ko.zst)
  REPOSITORY/VENDOR/MODEL/firmware/   the firmware they name (modinfo -F firmware)
  REPOSITORY/Generic/...              modules for every model
"""
EPILOG = f"""\
examples:
  imagefs driver inventory --output latitude-5540.json       (on the target machine)
  imagefs driver check golden.imagefs 1 --hardware latitude-5540.json nuc-13-pro.json
  imagefs driver check golden.imagefs 1 --hardware nuc.json --repository {REPO}
  imagefs driver add golden.imagefs 1 --repository {REPO} --hardware nuc.json
  imagefs driver add golden.imagefs all --repository {REPO} --model Intel/NUC-13-Pro
  imagefs driver add golden.imagefs 1 --path ./ifs_demo_nic.ko --dry-run
  imagefs driver list golden.imagefs 1
  imagefs driver remove golden.imagefs 1 ifs_demo_wifi ifs_demo_core
"""
CHECK_EXITS = ("exit codes: 0 every device has a driver with its firmware, 1 a device has "
               "none or its firmware is missing, 2 a bad inventory or repository, 3 no such "
               "image, index or file.")
ADD_EXITS = ("exit codes: 0 done (or nothing to do), 2 refused before anything changed (a "
             "module built for another kernel, a missing dependency or firmware, a "
             "dependency loop, a file that is not a module, no kernel, no depmod in the "
             "image), 3 no such image, index or file, 9 depmod or update-initramfs failed "
             "in the image (the image is unchanged).")


def _fill(text: str) -> str:
    return textwrap.fill(text, 88)


def register(sub: Any) -> None:
    p = sub.add_parser("driver", help="kernel modules and firmware matched to hardware",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=FMT)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    inv = actions.add_parser(
        "inventory", help="this machine's DMI identity and device modaliases, as JSON",
        description=_fill("Write this machine's hardware inventory: its DMI identity "
                          "(/sys/class/dmi/id: sys_vendor, product_name, board_name; empty "
                          "where the firmware has none) and the modalias of every device "
                          "(/sys/bus/*/devices/*/modalias), as the JSON `driver check` and "
                          "`driver add --hardware` read. Run it on the target machine."),
        epilog="example: imagefs driver inventory --output $(hostname).json",
        formatter_class=FMT)
    inv.add_argument("--output", metavar="FILE", help="write it to FILE (default: stdout)")
    inv.add_argument("--sys", metavar="DIR", default="/sys", help=argparse.SUPPRESS)
    inv.set_defaults(func=run_inventory)
    _register_check(actions)
    _register_add(actions)
    _register_list(actions)
    rm = actions.add_parser(
        "remove", help="take added drivers out, with firmware nothing else needs",
        description=_fill("Remove modules that `driver add` added (by module name) from "
                          "every kernel of INDEX, with the firmware no other added module "
                          "needs, and run the image's own depmod. A kernel's own module, one "
                          "another tool added, and one another added module depends on are "
                          "refused by name."),
        epilog=f"example: imagefs driver remove golden.imagefs 1 ifs_demo_nic\n{ADD_EXITS}",
        formatter_class=FMT)
    add_target(rm, "NAME", "NAME: module names, as `driver list` shows them.")
    rm.add_argument("--initramfs", action="store_true",
                    help="rebuild each kernel's initramfs afterwards (initramfs-tools), so the "
                         "removed modules leave it too")
    rm.set_defaults(func=run_remove)


def _register_check(actions: Any) -> None:
    p = actions.add_parser(
        "check", help="will the index drive these machines? (coverage per device)",
        description=_fill("For each hardware inventory, each kernel of INDEX and each "
                          "device: the module that would bind it (in-tree, added under "
                          "updates/, or built in), the firmware it names and whether the "
                          "image has it, and with --repository which repository module "
                          "would cover it. Read from the image without mounting it; "
                          "nothing changes."),
        epilog=f"example: imagefs driver check golden.imagefs 1 --hardware nuc.json "
               f"--repository {REPO}\n{CHECK_EXITS}", formatter_class=FMT)
    add_target(p, None, changes=False)
    p.add_argument("--hardware", metavar="FILE", nargs="+", action="extend", default=[],
                   required=True, help="hardware inventories (JSON, from driver inventory)")
    p.add_argument("--repository", metavar="DIR",
                   help="also say which module of this driver repository covers a device")
    p.set_defaults(func=run_check)


def _register_add(actions: Any) -> None:
    p = actions.add_parser(
        "add", help="install modules from a driver repository, with firmware and depmod",
        description=_fill(
            "Install kernel modules into every kernel of INDEX: those of --repository that "
            "match a device of --hardware (by modalias), those of a --model folder (and "
            "Generic/), or --all of them; or the files given with --path. For each kernel "
            "the build that fits it is taken (vermagic, ELF machine, symbol versions); a "
            "module built for another kernel is refused naming both kernels. The modules "
            "they depend on come along (refused when missing), their firmware goes to "
            "lib/firmware/, then the image's own depmod runs for each kernel in its "
            "container and its modprobe must find each module under updates/imagefs/."),
        epilog=f"{EPILOG}\n{ADD_EXITS}", formatter_class=FMT)
    add_target(p, None)
    p.add_argument("--repository", metavar="DIR", help="the driver repository")
    p.add_argument("--hardware", metavar="FILE", nargs="+", action="extend", default=[],
                   help="add the repository's modules for the devices of these inventories")
    p.add_argument("--model", metavar="VENDOR/MODEL",
                   help="add the modules of this model folder of the repository (and Generic/)")
    p.add_argument("--all", action="store_true", help="add every module of the repository")
    p.add_argument("--path", metavar="KO|DIR", nargs="+", action="extend", default=[],
                   help="add these module files, or the modules in these folders (their "
                        "firmware/ subfolder gives the firmware)")
    p.add_argument("--recurse", action="store_true", help="with --path DIR: also subfolders")
    p.add_argument("--initramfs", action="store_true",
                   help="rebuild each kernel's initramfs with the image's update-initramfs "
                        "(initramfs-tools)")
    p.add_argument("--missing-firmware-ok", action="store_true",
                   help="add modules even when firmware they name is nowhere to be found")
    p.set_defaults(func=run_add)


def _register_list(actions: Any) -> None:
    p = actions.add_parser(
        "list", help="the added (out-of-box) drivers; --all: every module",
        description=_fill("List the out-of-box drivers of each kernel of INDEX (modules "
                          "outside the kernel's own kernel/ tree) with their version, "
                          "aliases, firmware (and whether it is there) and where driver add "
                          "took them from. Read from the image without mounting it."),
        epilog="example: imagefs driver list golden.imagefs 1 --json | jq '.drivers[].name'",
        formatter_class=FMT)
    add_target(p, None, changes=False)
    p.add_argument("--all", action="store_true", help="also the kernel's own modules")
    p.set_defaults(func=run_list)


def _no_words(words: list[str]) -> None:
    if words:
        raise UsageError(f"unexpected argument {one_line(words[0])!r} (see --help)")


def run_inventory(args: argparse.Namespace) -> int:
    from servicing.driver_inventory import collect_inventory

    inv, skipped = collect_inventory(args.sys)
    for why in skipped:
        print(f"imagefs: left out: {why}", file=sys.stderr)
    data = json.dumps(inv.to_json(), indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(data)
        return 0
    tmp = f"{args.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
    os.replace(tmp, args.output)
    print(f"Wrote {len(inv.modaliases)} modaliases of {inv.identity()} to {args.output}.",
          file=sys.stderr)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from servicing.driver_check import check

    image, index, words = split_target(args, 0)
    _no_words(words)
    doc = None
    if image is not None:
        with daemon_client(args) as c:
            if c is not None:
                doc = call(c, "drivers.check", image=absolute(image), index=index,
                           hardware=[absolute(h) for h in args.hardware],
                           repository=absolute(args.repository) if args.repository else None)
    if doc is None:
        doc = check(image, index, args.mount, args.hardware, args.repository).to_json()
    if args.json:
        print_json(doc)
    else:
        show_check(doc)
    return 0 if doc["ok"] else 1


def run_add(args: argparse.Namespace) -> int:
    from servicing.drivers import DriverAdd, Selection

    image, index, words = split_target(args, 0)
    _no_words(words)

    def paths(values: list[str]) -> list[str]:
        return [absolute(v) for v in values]

    sel = Selection(absolute(args.repository) if args.repository else None,
                    paths(args.hardware), args.model, args.all, paths(args.path),
                    args.recurse).check()
    params = {**sel.to_json(), "initramfs": args.initramfs,
              "missing_firmware_ok": args.missing_firmware_ok}
    return run_change(args, image, index,
                      lambda: DriverAdd(sel, args.initramfs, args.missing_firmware_ok),
                      "drivers.add", params)


def run_remove(args: argparse.Namespace) -> int:
    from servicing.driver_remove import DriverRemove

    image, index, names = split_target(args, 1)
    return run_change(args, image, index, lambda: DriverRemove(names, args.initramfs),
                      "drivers.remove", {"names": names, "initramfs": args.initramfs})


def run_list(args: argparse.Namespace) -> int:
    from servicing.driver_list import drivers_of

    image, index, words = split_target(args, 0)
    _no_words(words)
    doc = None
    if image is not None:
        with daemon_client(args) as c:
            if c is not None:
                doc = call(c, "drivers.list", image=absolute(image), index=index,
                           all=args.all)
    if doc is None:
        doc = drivers_of(image, index, args.mount, args.all).to_json()
    if args.json:
        print_json(doc)
    else:
        show_list(doc)
    return 0


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = "") -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    for row in [head, *rows]:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _driver_cell(b: dict[str, Any]) -> str:
    mark = {"in-tree": "", "updates": " (updates)", "out-of-tree": " (out-of-tree)",
            "built-in": " (built-in)"}.get(b["where"], f" ({b['where']})")
    return one_line(b["name"]) + mark


def _firmware_cell(bindings: list[dict[str, Any]]) -> str:
    needed = [f for b in bindings for f in b["firmware"]]
    missing = [one_line(f["name"]) for f in needed if not f["found"]]
    if missing:
        return "missing: " + ", ".join(missing)
    return "ok" if needed else "-"


def show_check(doc: dict[str, Any]) -> None:
    """Per inventory and kernel: a row per device, then the counts and notes."""
    for inv in doc["inventories"]:
        print(f"{one_line(inv['hardware'])}: {one_line(inv['identity'])}")
        for k in inv["kernels"]:
            print(f"  kernel {one_line(k['release'])}:")
            rows = []
            for d in k["devices"]:
                offer = ", ".join(f"{one_line(r['name'])} ({one_line(r['path'])})"
                                  for r in d["repository"] if not d["modules"])
                rows.append((one_line(d["modalias"]),
                             ", ".join(_driver_cell(b) for b in d["modules"]) or "-",
                             _firmware_cell(d["modules"]), offer or "-"))
            head = ("MODALIAS", "DRIVER", "FIRMWARE",
                    "REPOSITORY" if doc.get("repository") else "")
            _table(head, [r if doc.get("repository") else (*r[:3], "") for r in rows], "    ")
            more = k["covered_with_repository"] - k["covered"]
            print(f"    {k['covered']} of {k['total']} devices have a driver in the index"
                  + (f"; the repository covers {more} more" if doc.get("repository") else "")
                  + (f"; {k['missing_firmware']} lack firmware" if k["missing_firmware"]
                     else "") + ".")
            for note in k["notes"]:
                print(_fill(f"    note: {note}").replace("\n", "\n    "))
    print("Every device has a driver with its firmware." if doc["ok"] else
          "Some devices have no driver or lack firmware (exit code 1).")


def show_list(doc: dict[str, Any]) -> None:
    drivers = doc["drivers"]
    if not drivers:
        kernels = ", ".join(doc["kernels"]) or "none"
        print(f"No out-of-box drivers (kernels: {kernels}).")
        return
    rows = []
    for d in drivers:
        fw = ", ".join(one_line(f["name"]) + ("" if f["found"] else " (missing)")
                       for f in d["firmware"]) or "-"
        origin = (f"{one_line(d['folder'] or d['source'])} ({d['added']})"
                  if d["added_by_imagefs"] else ("kernel" if d["where"] == "in-tree"
                                                 else "not added by imagefs"))
        rows.append((one_line(d["kernel"]), one_line(d["name"]), one_line(d["version"]) or "-",
                     d["where"] + ("" if d["indexed"] else ", not indexed"),
                     str(len(d["aliases"])), fw, origin))
    _table(("KERNEL", "MODULE", "VERSION", "WHERE", "ALIASES", "FIRMWARE", "FROM"), rows)
    for d in drivers:
        if d["error"]:
            print(f"  {one_line(d['name'])}: {one_line(d['error'])}")
