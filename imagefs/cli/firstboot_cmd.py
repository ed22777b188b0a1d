"""imagefs firstboot add | list | remove: the first-boot queue of an index, scripts run once,
in order, at its next boot (DISM's pending operations, virt-customize --firstboot).

The queue's layout in the image and its semantics are servicing.firstboot's; this module
reads the script the admin gives (--script FILE, --command CMD), runs the changes through
the servicing transaction (or the daemon's firstboot.add and firstboot.remove), and shows
the queue read straight from the image.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import textwrap
from typing import Any

from imagefs.errors import NotFound, UsageError, one_line

from ._common import print_json
from ._daemon import absolute, call, daemon_client
from ._servicing import add_target, run_change, split_target

MAX_SHOWN = 100  # characters of a listed field or output line on a terminal
OUTPUT_SHOWN = 5  # output lines shown under a failed or interrupted item

DESCRIPTION = """\
The first-boot queue of an index: scripts that must run on the booted machine (what DISM
calls pending operations, virt-customize --firstboot). imagefs places a systemd unit,
imagefs-firstboot.service, in the index; at the next boot it runs the queued items once
each, in order, as root. An item interrupted by a power cut runs again at the next boot;
a finished one never runs again. Each item's exit code and output are kept in the image
(/var/lib/imagefs/firstboot/done/) and shown in the journal (journalctl -u
imagefs-firstboot). A failing item does not stop the next ones; the unit then shows as
failed. Items should be safe to run twice (a power cut in the middle of one runs it again).
"""

EPILOG = """\
examples:
  imagefs firstboot add golden.imagefs 1 --command 'ssh-keygen -A' --name host-keys
  imagefs firstboot add golden.imagefs web --script ./enroll.sh
  imagefs firstboot add golden.imagefs all --command 'update-grub' --dry-run
  imagefs firstboot list golden.imagefs 1
  imagefs firstboot list golden.imagefs 1 --json | jq '.items[] | {id, state, exit_code}'
  imagefs firstboot remove golden.imagefs 1 0002 enroll.sh
  imagefs mount --rw golden.imagefs 1 /mnt/edit
  imagefs firstboot add --mount /mnt/edit --command 'systemctl enable --now foo'
  imagefs commit /mnt/edit

Boot a mount to run the queue (as root): systemd-nspawn -D /mnt/edit --boot
"""


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("firstboot", help="queue scripts to run once at an index's next boot",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add", help="queue a script (or a command) for the next boot",
        description=_wrap("Queue a script to run once, as root, at the next boot of INDEX, after "
            "the items already queued; the first item also installs and enables "
            "imagefs-firstboot.service in the index."),
        epilog=EPILOG, formatter_class=fmt)
    add_target(add, None)
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--command", metavar="CMD",
                      help="a shell command (run by /bin/sh; quote it as one word)")
    what.add_argument("--script", metavar="FILE",
                      help="a script file (UTF-8 text up to 1 MiB; its #! line says what "
                           "runs it, /bin/sh without one)")
    add.add_argument("--name", metavar="NAME",
                     help="the item's name (letters, digits, '.', '_', '-'; default: the "
                          "script's file name, or 'command')")
    add.set_defaults(func=run_add)
    ls = actions.add_parser(
        "list", help="every item: queued ones and those that ran, with their results",
        description=_wrap("List the first-boot items of INDEX, read straight from the image "
            "without mounting it (or from the mount MNT): queued ones, interrupted "
            "ones (they run again), and those that ran, with their exit code, when "
            "they ran and the first lines of their output."),
        epilog=EPILOG, formatter_class=fmt)
    add_target(ls, None, changes=False)
    ls.set_defaults(func=run_list)
    rm = actions.add_parser(
        "remove", help="take queued items out of the queue",
        description=_wrap("Remove queued items of INDEX by id (0002 or 2) or by name (every "
            "queued item of that name). Items that already ran are history: they "
            "cannot be removed."),
        epilog=EPILOG, formatter_class=fmt)
    add_target(rm, "ID|NAME")
    rm.set_defaults(func=run_remove)


def run_add(args: argparse.Namespace) -> int:
    from servicing.firstboot import FirstbootAdd, check_name, command_script

    image, index, words = split_target(args, 0)
    _no_more(words)
    if args.command is not None:
        script, name, origin = command_script(args.command), "command", "firstboot add --command"
    else:
        script, name = read_script(args.script), default_name(args.script)
        origin = f"firstboot add --script {os.path.basename(args.script)}"
    name = check_name(args.name if args.name is not None else name)
    params = {"name": name, "script": script.decode(), "origin": origin}
    return run_change(args, image, index, lambda: FirstbootAdd(name, script, origin),
                      "firstboot.add", params)


def run_remove(args: argparse.Namespace) -> int:
    from servicing.firstboot import FirstbootRemove

    image, index, words = split_target(args, 1)
    return run_change(args, image, index, lambda: FirstbootRemove(words),
                      "firstboot.remove", {"items": words})


def run_list(args: argparse.Namespace) -> int:
    from servicing.firstboot import Item, list_items
    from servicing.roots import IndexRoot, MountRoot

    image, index, words = split_target(args, 0)
    _no_more(words)
    doc: dict[str, Any] = {"image": None, "index": None, "name": None, "mount": None}
    if image is None:
        if not os.path.isdir(args.mount):
            raise NotFound(f"{args.mount}: no such directory")
        root = MountRoot(args.mount)
        doc["mount"] = root.path
        items = list_items(root)
        label = root.label
    else:
        with daemon_client(args) as c:
            if c is not None:
                doc = call(c, "firstboot.list", image=absolute(image), index=index)
                return _print_list(args, doc, f"index {doc['index']} ({doc['name']})",
                                   [Item(**i) for i in doc["items"]])
        from imagefs.image import Image

        with Image.open(image) as img:
            view = img.view(index if index is not None else "")
            iroot = IndexRoot(view)
            items = list_items(iroot)
        doc.update(image=os.path.abspath(image), index=view.number, name=view.entry.name)
        label = iroot.label
    doc["items"] = [i.to_json() for i in items]
    doc["pending"] = sum(1 for i in items if i.pending)
    return _print_list(args, doc, label, items)


def _print_list(args: argparse.Namespace, doc: dict[str, Any], label: str,
                items: list[Any]) -> int:
    if args.json:
        print_json(doc)
    else:
        _show(label, items)
    return 0


def _show(label: str, items: list[Any]) -> None:
    if not items:
        print(f"No first-boot items in {one_line(label)}.")
        return
    rows = [(i.id, _cut(i.name), i.state, "" if i.exit_code is None else str(i.exit_code),
             i.finished or i.started or i.added, _cut(i.origin)) for i in items]
    head = ("ID", "NAME", "STATE", "EXIT", "WHEN", "ORIGIN")
    widths = [max([len(h), *(len(r[n]) for r in rows)]) for n, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for item, row in zip(items, rows, strict=True):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if item.state in ("failed", "interrupted", "unknown"):
            for line in item.output[:OUTPUT_SHOWN]:
                print(f"      | {_cut(line)}")
    waiting = sum(1 for i in items if i.pending)
    print(f"{waiting} item{'' if waiting == 1 else 's'} will run at the next boot of "
          f"{one_line(label)}.")


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def _cut(text: str) -> str:
    text = one_line(text)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _no_more(words: list[str]) -> None:
    if words:
        raise UsageError(f"unexpected argument {one_line(words[0])!r} (see --help)")


def read_script(path: str) -> bytes:
    """The script in the file path (--script): a regular file of at most MAX_SCRIPT bytes,
    read without blocking on a FIFO or a device."""
    from servicing.firstboot import MAX_SCRIPT, check_script

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path}: not a regular file")
        if st.st_size > MAX_SCRIPT:
            raise UsageError(f"{path}: {st.st_size} bytes, over the limit of {MAX_SCRIPT} "
                             "for a first-boot script")
        data = b""
        while len(data) <= MAX_SCRIPT and (more := os.read(fd, MAX_SCRIPT + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    return check_script(data)


def default_name(path: str) -> str:
    """An item's name from its script file's name, made safe ("script" if nothing is
    left)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(path)).lstrip("._-")[:64]
    return name if name and not name.isdigit() else "script"
