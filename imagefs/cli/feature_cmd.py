"""imagefs feature list | enable | disable | mask | unmask | apply: the systemd units of an
index (DISM's /Get-Features, /Enable-Feature, /Disable-Feature), listed as the host's
`systemctl --root` lists them, changed with it in a servicing transaction, and roles (a
TOML file of units and packages) applied as one (servicing.features, servicing.roles)."""

from __future__ import annotations

import argparse
import os
from textwrap import fill
from typing import Any

from imagefs.errors import NotFound, UsageError, one_line

from ._common import print_json
from ._daemon import absolute, call, daemon_client
from ._servicing import add_target, run_change, split_target

DESCRIPTION = """\
The systemd units of an index, as features that start or not. `list` shows every unit
file and its state exactly as `systemctl --root=MNT list-unit-files` reports it (the host's
systemctl, reading a copy of the index's unit directories: nothing is mounted). `enable`,
`disable`, `mask` and `unmask` run `systemctl --root` in a writable session of the index
(never preset-all), keep Debian's bookkeeping with the image's own tools (the rc links of
an /etc/init.d script of the same name; deb-systemd-helper's state, so that reinstalling
or upgrading the package keeps a disabled unit disabled and a mask a mask), check each
unit with `systemctl --root is-enabled`, and commit. `apply` does a role file's packages
and units in one transaction.
"""

EPILOG = """\
examples:
  imagefs feature list golden.imagefs 1
  imagefs feature list golden.imagefs web --state enabled,masked --json
  imagefs feature disable golden.imagefs 1 apt-daily.timer apt-daily-upgrade.timer
  imagefs feature mask golden.imagefs all systemd-timesyncd --dry-run
  imagefs feature enable golden.imagefs web chrony.service --new-index web-ntp
  imagefs feature apply golden.imagefs web roles/web.toml
  imagefs feature disable --mount /mnt/edit ssh      (in your writable mount; you commit)

A UNIT without a type suffix is a .service (as systemctl takes it).
"""

CHANGE_HELP = {
    "enable": ("start the units at boot (the links their [Install] section names)",
               "Refused: unknown units, aliases (the unit they name is given), masked "
               "units (unmask first), static and indirect units (nothing to enable)."),
    "disable": ("stop starting the units at boot",
                "Refused: unknown units, aliases, static and indirect units (nothing enables "
                "them: mask them instead). A masked unit is left as it is."),
    "mask": ("make the units impossible to start (a link to /dev/null in /etc)",
             "A mask deb-systemd-helper made (which a reinstall would lift) becomes the "
             "admin's. Refused: unknown units, aliases, a unit file of the admin's in "
             "/etc/systemd/system (its place)."),
    "unmask": ("lift a mask made in /etc (or /run)",
               "Refused: unknown units, aliases, masks the package ships in its unit "
               "directory."),
}

EXITS = ("exit codes: 0 done (or nothing to do), 2 refused before anything changed, 3 no "
         "such image, index or file, 9 systemctl or a tool of the image failed (the image is "
         "unchanged; its output follows the error).")

ROLE_EPILOG = """\
a role file (TOML; paths are relative to it; every key is optional):
  description = "web front end"
  [packages]
  add = ["debs/nginx-light_1.22.1-9+deb12u1_amd64.deb"]
  repository = "debs"          # a folder of .debs for their dependencies
  remove = ["tree"]
  purge = false
  [units]
  enable = ["nginx.service"]
  disable = ["apt-daily.timer", "apt-daily-upgrade.timer"]
  mask = ["e2scrub_reap.service"]
  unmask = []

Packages are removed, then added (the image's dpkg), then units are unmasked, disabled,
enabled and masked, all in one session: committed together or not at all. A unit that a
package of the role brings may be named. Unknown keys, wrong types, lists over 256
entries and names that are not unit or package names are refused (exit 2).

""" + EXITS


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("feature", help="the systemd units of an index: list, enable, "
                       "disable, mask, unmask, apply a role", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=fmt)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list", help="every unit file and its state (systemctl list-unit-files)",
        description=fill("Every unit file of INDEX and its state (enabled, disabled, "
                         "static, masked, alias, indirect, generated, transient, "
                         "enabled-runtime, linked, ...) and vendor preset, as `systemctl "
                         "--root=MNT list-unit-files` reports them on a mount of the index. "
                         "Nothing is mounted and nothing changes.", 79),
        epilog="example: imagefs feature list golden.imagefs 1 --state enabled",
        formatter_class=fmt)
    add_target(ls, None, changes=False)
    ls.add_argument("--state", metavar="STATE[,STATE]",
                    help="show only units in these states")
    ls.set_defaults(func=run_list)
    for verb, (short, refused) in CHANGE_HELP.items():
        c = actions.add_parser(verb, help=short, formatter_class=fmt,
                               description=fill(f"{short[0].upper()}{short[1:]} in INDEX, "
                                                "with the host's systemctl --root, as one "
                                                f"transaction. {refused}", 79),
                               epilog=f"{EPILOG}\n{EXITS}")
        add_target(c, "UNIT", "UNIT: unit names (chrony.service, apt-daily.timer).")
        c.set_defaults(func=run_change_units, feature_verb=verb)
    ap = actions.add_parser(
        "apply", help="a role file's packages and units, in one transaction",
        formatter_class=fmt, epilog=ROLE_EPILOG,
        description=fill("Apply the role file ROLE.toml to INDEX: the packages it names "
                         "are removed and added with the image's own dpkg, the units it "
                         "names are unmasked, disabled, enabled and masked with systemctl "
                         "--root, all in one writable session, checked, and committed "
                         "together (or, on any failure, not at all).", 79))
    add_target(ap, "ROLE.toml", "ROLE.toml: the role file (see below).")
    ap.set_defaults(func=run_apply)


def run_change_units(args: argparse.Namespace) -> int:
    from servicing.features import FeatureChange, unit_names

    image, index, words = split_target(args, 1)
    units = unit_names(words)  # refused here, before any daemon is asked
    return run_change(args, image, index, lambda: FeatureChange(args.feature_verb, units),
                      f"features.{args.feature_verb}", {"units": units})


def run_apply(args: argparse.Namespace) -> int:
    from servicing.roles import RoleApply, read_role

    image, index, words = split_target(args, 1)
    if len(words) != 1:
        raise UsageError("give one role file (IMAGE INDEX ROLE.toml)")
    role = read_role(words[0])  # refused here, before any daemon is asked
    return run_change(args, image, index, lambda: RoleApply(role), "features.apply",
                      {"role": absolute(words[0])})


def run_list(args: argparse.Namespace) -> int:
    image, index, words = split_target(args, 0)
    if words:
        raise UsageError(f"unexpected argument {one_line(words[0])!r} (see --help)")
    if image is None:
        from servicing.features import list_features_mount

        if not os.path.isdir(args.mount):
            raise NotFound(f"{args.mount}: no such directory")
        doc = list_features_mount(args.mount).to_json()
    else:
        assert index is not None
        doc = _listed(args, image, index)
    if args.state:
        wanted = {s.strip() for s in args.state.split(",") if s.strip()}
        doc["units"] = [u for u in doc["units"] if u["state"] in wanted]
    if args.json:
        print_json(doc)
    else:
        show_list(doc)
    return 0


def _listed(args: argparse.Namespace, image: str, index: str) -> dict[str, Any]:
    with daemon_client(args) as c:
        if c is not None:
            doc: dict[str, Any] = call(c, "features.list", image=absolute(image),
                                       index=index)
            return doc
    from servicing.features import list_features

    return list_features(image, index).to_json()


def show_list(doc: dict[str, Any]) -> None:
    """As systemctl prints it: UNIT FILE, STATE, PRESET; then the count."""
    # Names come from the image: shown escaped, never obeyed.
    rows = [(one_line(u["unit"]), one_line(u["state"]), one_line(u["preset"] or "-"))
            for u in doc["units"]]
    head = ("UNIT FILE", "STATE", "PRESET")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(rows)} unit files listed.")
