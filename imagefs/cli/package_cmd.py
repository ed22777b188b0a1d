"""imagefs package list | add | remove: the Debian packages of an index (DISM /Get-Packages,
/Add-Package, /Remove-Package), listed from its dpkg database, added and removed with the
image's own dpkg in a servicing transaction (servicing.packages)."""

from __future__ import annotations

import argparse
from textwrap import fill
from typing import Any

from imagefs.errors import one_line

from ._common import print_json
from ._daemon import absolute
from ._servicing import add_target, run_change, split_target

ADD_EPILOG = """examples:
  imagefs package add golden.imagefs web ./hello_2.10-3_amd64.deb
      install one package into index "web" and commit it
  imagefs package add golden.imagefs 1 jq_1.6-2.1+deb12u3_amd64.deb --repository ./debs
      install jq; its dependencies (libjq1, libonig5) are taken from ./debs
  imagefs package add golden.imagefs all chrony_4.3-2+deb12u3_amd64.deb --dry-run
      show what would be installed in every index, change nothing
  imagefs package add golden.imagefs 1 site-agent.deb --defer-configure
      unpack now, configure at the first boot (the package shows as unpacked until then)
  imagefs package add golden.imagefs 1 hello.deb --new-index web-with-hello
      keep index 1 as it is and commit the result as a new index
  imagefs package add --mount /mnt/web hello.deb
      work in a writable mount you opened (imagefs mount --rw); you commit it

exit codes: 0 done (or nothing to do), 2 refused before anything changed (an unmet
dependency, a conflict, a wrong architecture, a downgrade, a file that is not a valid
package), 3 no such image, index or file, 9 dpkg or a maintainer script failed (the
image is unchanged; dpkg's output follows the error).
"""

REMOVE_EPILOG = """examples:
  imagefs package remove golden.imagefs web tree
      remove tree (its configuration files stay, as with apt remove)
  imagefs package remove golden.imagefs web chrony --purge
      remove chrony and its configuration files
  imagefs package remove golden.imagefs 1 libjq1 --with-dependents
      remove libjq1 and the packages that need it (jq)
  imagefs package remove golden.imagefs 1,2 hello --dry-run
      show what would be removed from indices 1 and 2

exit codes: 0 done (or nothing to do), 2 refused (an essential package, a package others
need without --with-dependents, a name that is not installed), 3 no such image or
index, 9 dpkg or a maintainer script failed (the image is unchanged).
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "package", help="the Debian packages of an index",
        description="Offline package servicing of a Debian index (as DISM's /Get-Packages, "
                    "/Add-Package, /Remove-Package). `list` reads the index's own dpkg "
                    "database straight from the image, without mounting it; `add` and "
                    "`remove` run the image's own dpkg in a transaction: planned, applied "
                    "in a writable session, checked, then committed or discarded.",
        epilog="examples: imagefs package list golden.imagefs bookworm-web --json; "
               "imagefs package add golden.imagefs 1 hello.deb; "
               "imagefs package remove golden.imagefs 1 hello --purge")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "list", help="name, version, architecture and state of every package",
        description="List the packages of INDEX as its dpkg database records them: the "
                    "same packages `dpkg-query --admindir=MNT/var/lib/dpkg -W` shows on a "
                    "mount of the index, with their architecture and state (installed, "
                    "unpacked, config-files, ...). Nothing is mounted and nothing changes.",
        epilog="example: imagefs package list golden.imagefs 1 | grep openssh")
    ls.add_argument("image", metavar="IMAGE")
    ls.add_argument("index", metavar="INDEX")
    ls.add_argument("--json", action="store_true",
                    help="print {image, index, name, architecture, packages: [{package, "
                         "name, version, architecture, multi_arch, want, state}]}")
    ls.set_defaults(func=run_list)
    _register_add(actions)
    _register_remove(actions)


def _register_add(actions: Any) -> None:
    p = actions.add_parser(
        "add", help="install .deb packages with the image's own dpkg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=fill("Install DEB files into INDEX with the image's own dpkg, run in a "
                    "container rooted at a writable session of the index, then check the "
                    "result with dpkg --audit and commit it (or, on any failure, leave the "
                    "image as it was). Dependencies must be met by the packages given, "
                    "by --repository or by what the index has installed; unmet "
                    "dependencies, conflicts, another architecture, a downgrade and files "
                    "that are not valid packages are refused before anything changes.", 79),
        epilog=ADD_EPILOG)
    add_target(p, "DEB", "DEB: .deb files to install (dpkg orders them).")
    p.add_argument("--repository", metavar="DIR",
                   help="a folder of .debs (searched with its subfolders, indexed on the "
                        "fly) from which missing dependencies are taken")
    p.add_argument("--defer-configure", action="store_true",
                   help="unpack now and queue the configuration (dpkg --configure "
                        "--pending) for the image's first boot; the packages show as "
                        "unpacked (iU) until then")
    p.set_defaults(func=run_add)


def _register_remove(actions: Any) -> None:
    p = actions.add_parser(
        "remove", help="remove packages with the image's own dpkg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=fill("Remove the packages NAME from INDEX with the image's own dpkg (dpkg "
                    "--remove, or --purge), check with dpkg --audit, and commit. Refused "
                    "when other installed packages need them (they are listed; "
                    "--with-dependents removes them too) and for essential packages (or "
                    "packages an essential one needs).", 79),
        epilog=REMOVE_EPILOG)
    add_target(p, "NAME", "NAME: installed packages (name or name:arch).")
    p.add_argument("--purge", action="store_true",
                   help="also remove their configuration files (dpkg --purge)")
    p.add_argument("--with-dependents", action="store_true",
                   help="also remove the installed packages that depend on them")
    p.set_defaults(func=run_remove)


def run_add(args: argparse.Namespace) -> int:
    image, index, debs = split_target(args, 1)
    repo = args.repository

    def make() -> Any:
        from servicing.packages import PackageAdd

        return PackageAdd(debs, repo, args.defer_configure)

    from servicing.reads import DPKG_READS

    return run_change(args, image, index, make, "packages.add",
                      {"debs": [absolute(d) for d in debs],
                       "repository": absolute(repo) if repo is not None else None,
                       "defer_configure": args.defer_configure}, reads=DPKG_READS)


def run_remove(args: argparse.Namespace) -> int:
    image, index, names = split_target(args, 1)

    def make() -> Any:
        from servicing.packages import PackageRemove

        return PackageRemove(names, args.purge, args.with_dependents)

    from servicing.reads import DPKG_READS

    return run_change(args, image, index, make, "packages.remove",
                      {"names": names, "purge": args.purge,
                       "with_dependents": args.with_dependents}, reads=DPKG_READS)


def run_list(args: argparse.Namespace) -> int:
    from servicing.packages import list_packages

    found = list_packages(args.image, args.index)
    if args.json:
        print_json(found.to_json())
        return 0
    # The database is the image's: whatever a name holds is shown, never obeyed.
    rows = [(one_line(p.qualified_name(found.native)), one_line(p.version),
             one_line(p.architecture), p.state) for p in found.packages]
    widths = [max([len(h), *(len(r[i]) for r in rows)])
              for i, h in enumerate(("PACKAGE", "VERSION", "ARCH", "STATE"))]
    for row in [("PACKAGE", "VERSION", "ARCH", "STATE"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
