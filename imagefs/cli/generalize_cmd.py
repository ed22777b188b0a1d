"""imagefs generalize: strip one machine's identity from an index (Sysprep /generalize,
virt-sysprep) as a servicing transaction (servicing.generalize), or list its operations."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import UsageError, one_line

from ._common import human, print_json
from ._daemon import absolute, call, daemon_client
from ._servicing import add_target, run_change, say_committed, split_target

DESCRIPTION = """\
Make an index fit to be cloned onto many machines: remove what makes it one machine (its
machine ID, SSH host keys, hostname, logs and journal, shell histories, DHCP leases,
random seed, caches, ...), as Sysprep /generalize and virt-sysprep do. Each of these is a
named operation (--list shows them, what each does and whether it runs by default).
The plan is made from the index without mounting it, and lists every path to be removed
or changed, with its size (--dry-run prints it and changes nothing); then the changes are
made in a writable session, checked, and committed in one commit (or as a new index with
--new-index, which shares every byte of content with INDEX). Nothing is ever followed
through a symlink: a symlink is removed as itself, never what it points at.

At the first boot of a clone, systemd makes a new machine ID (/etc/machine-id says
`uninitialized`) and the first-boot queue (imagefs firstboot) runs `ssh-keygen -A`
before ssh.service starts, so every clone has its own; for that boot systemd's
first-boot presets are held off, so every unit stays enabled or disabled as in INDEX.
"""

EPILOG = """\
--operations (virt-sysprep's syntax; names separated by commas):
  A,B          only the operations A and B
  -C           the default operations without C
  +D           the default operations and D (one that is off by default)
  defaults,+D  the same; `all` is every operation
  The machine-id operation always runs last, whatever the order given. A spec that
  starts with '-' must be joined to the option: --operations=-ssh-hostkeys.

examples:
  imagefs generalize --list
  imagefs generalize golden.imagefs 1 --list
      what each operation finds in index 1
  imagefs generalize golden.imagefs 1 --dry-run
      every path the default operations would remove or change, with sizes
  imagefs generalize golden.imagefs web --new-index web-generalized
      keep index "web" as it is, commit the generalized copy as a new index
  imagefs generalize golden.imagefs 1 --operations=-ssh-hostkeys,-hostname
  imagefs generalize golden.imagefs all --operations +ssh-userdir
  imagefs generalize golden.imagefs 1 --operations machine-id,ssh-hostkeys --json
  imagefs mount --rw golden.imagefs 1 /mnt/edit
  imagefs generalize --mount /mnt/edit && imagefs commit /mnt/edit

exit codes: 0 done (or nothing to do), 2 a bad --operations or a refused plan (the
image is unchanged), 3 no such image or index, 9 a change failed (nothing was changed).
"""


def register(sub: Any) -> None:
    p = sub.add_parser("generalize", help="strip an index of one machine's identity "
                       "(Sysprep /generalize, virt-sysprep)", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target(p, None)
    p.add_argument("--operations", metavar="SPEC",
                   help="which operations run (see below; default: those marked as "
                        "default in --list)")
    p.add_argument("--list", action="store_true",
                   help="list the operations, what each does and whether it runs by "
                        "default (with IMAGE INDEX: what each finds there); change "
                        "nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from servicing.generalize import Generalize, select

    select(args.operations)  # a bad spec is refused before anything is opened
    if args.list:
        return run_list(args)
    image, index, words = split_target(args, 0)
    if words:
        raise UsageError(f"unexpected argument {one_line(words[0])!r} (see --help)")
    spec = args.operations
    return run_change(args, image, index, lambda: Generalize(spec), "generalize.run",
                      {"operations": spec}, show=show)


def run_list(args: argparse.Namespace) -> int:
    from servicing.generalize import listing, survey

    if args.mount is not None:
        raise UsageError("--list takes IMAGE INDEX, or nothing; not --mount")
    words = list(args.words)
    if len(words) not in (0, 2):
        raise UsageError("--list takes IMAGE INDEX, or nothing")
    if getattr(args, "dry_run", False) or getattr(args, "new_index", None):
        raise UsageError("--list changes nothing: leave out --dry-run and --new-index")
    with daemon_client(args) as c:
        if c is not None and words:
            doc = call(c, "generalize.list", image=absolute(words[0]), index=words[1],
                       operations=args.operations)
        else:
            doc = {"operations": listing(args.operations), "image": None, "index": None,
                   "name": None, "found": None}
            if words:
                doc.update(survey(words[0], words[1]), image=absolute(words[0]))
    if args.json:
        print_json(doc)
    else:
        _show_list(doc, args.operations is not None)
    return 0


def _show_list(doc: dict[str, Any], selected: bool) -> None:
    found = doc.get("found")
    head = ["NAME", "DEFAULT", *(["CHOSEN"] if selected else []),
            *([f"IN INDEX {doc['index']}"] if found else []), "WHAT IT DOES"]
    rows = []
    for op in doc["operations"]:
        row = [op["name"], "yes" if op["default"] else "no"]
        if selected:
            row.append("yes" if op["selected"] else "no")
        if found:
            f = found.get(op["name"]) or {}
            row.append("refused" if f.get("refused") else plural(f.get("paths", 0), "path")
                       + (f" ({human(f['bytes'])})" if f.get("bytes") else ""))
        row.append(op["description"])
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if found:
        print(f"In index {doc['index']} ({one_line(doc['name'])}); "
              f"`imagefs generalize IMAGE {doc['index']} --dry-run` lists every path.")


def show(doc: dict[str, Any]) -> None:
    """Each index's operations and every path each removes or changes, then a total."""
    for item in doc["indices"]:
        print(f"index {item['index']} ({one_line(item['name'])}):")
        plan = item["plan"]
        for line in plan.get("lines") or ["nothing to do"]:
            print(f"  {one_line(line)}")
        queued = plan.get("items_queued", 0)
        print(f"  in all: {plural(plan.get('paths_removed', 0), 'path')} removed "
              f"({human(plan.get('bytes_removed', 0))}), {plan.get('paths_changed', 0)} "
              "changed" + (f", {plural(queued, 'first-boot item')} queued"
                 if queued else ""))
    say_committed(doc)


def plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"
