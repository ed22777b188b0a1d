"""What the servicing verbs share (package, health, firstboot): where they work (IMAGE INDEX,
or --mount MNT), --dry-run, --new-index, --json, the daemon path, and how a plan and its
outcome are shown.

A verb builds a servicing Change from its arguments; run_change runs it through
servicing.transaction (or the daemon's method of the same name) and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imagefs.errors import DaemonRefused, ServicingFailed, UsageError, one_line

from ._common import human, print_json
from ._daemon import absolute, add_daemon_options, call, daemon_client, run_job

if TYPE_CHECKING:
    from daemon.forkserver import PendingMount

TARGET_HELP = ("IMAGE INDEX: the verb opens its own writable session of INDEX (a number, a "
               "name, a list such as 1,3, or all), works in it, and commits all the indices "
               "in one atomic commit, or none. --mount MNT: it works inside the writable "
               "mount MNT (imagefs mount --rw) and leaves the commit to you.")


def add_target(p: argparse.ArgumentParser, items: str | None, items_help: str = "",
               changes: bool = True) -> None:
    """IMAGE INDEX [ITEMS...] | --mount MNT [ITEMS...], and the options every servicing
    verb has.  items: the metavar of the verb's own positional words (None: none)."""
    metavar = "IMAGE INDEX" + (f" {items}..." if items else "")
    p.add_argument("words", nargs="*", metavar=metavar,
                   help=f"{TARGET_HELP} {items_help}".strip())
    p.add_argument("--mount", metavar="MNT",
                   help="work in this writable mount instead of IMAGE INDEX")
    if changes:
        p.add_argument("--dry-run", action="store_true",
                       help="print the plan and change nothing (the image file stays byte "
                            "for byte the same)")
        p.add_argument("--new-index", metavar="NAME",
                       help="commit the result as a new index NAME; INDEX stays as it was")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    add_daemon_options(p)


def split_target(args: argparse.Namespace, items: int
                 ) -> tuple[str | None, str | None, list[str]]:
    """(image, index, the verb's words) or, with --mount, (None, None, words); refuses
    fewer than `items` words of the verb's own."""
    words = list(args.words)
    if args.mount is None:
        if len(words) < 2:
            raise UsageError("give IMAGE INDEX (or --mount MNT)")
        image, index, words = words[0], words[1], words[2:]
    else:
        image = index = None
        if getattr(args, "new_index", None):
            raise UsageError("--new-index needs IMAGE INDEX: with --mount the commit is "
                             "yours (imagefs commit MNT --new-index NAME)")
    if len(words) < items:
        raise UsageError("nothing to do: give what to work on (see --help)")
    return image, index, words


class StatusLine:
    """A servicing verb's steps on a terminal's status line (stderr); nothing otherwise."""

    def __init__(self, status: Any) -> None:
        self._status = status

    def step(self, text: str) -> None:
        if self._status is not None:
            self._status.update(one_line(text))


@contextmanager
def status_line(enabled: bool) -> Iterator[StatusLine]:
    if not enabled or not sys.stderr.isatty():
        yield StatusLine(None)
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        yield StatusLine(status)


def run_change(args: argparse.Namespace, image: str | None, index: str | None,
               make: Callable[[], Any], method: str, params: dict[str, Any],
               show: Callable[[dict[str, Any]], None] | None = None,
               reads: Sequence[str] = ()) -> int:
    """Run the Change make() builds, here or through the daemon's `method` (with params,
    which name the same change), print the outcome; the exit code.  make() is called only
    here, without a daemon: a verb imports its servicing module in it, after the mounts
    were asked for (reads: the change's, servicing.transaction.Change)."""
    dry_run = bool(getattr(args, "dry_run", False))
    new_index = getattr(args, "new_index", None)
    try:
        with daemon_client(args) as c:
            if c is not None:
                where = ({"image": absolute(image), "index": index} if image is not None
                         else {"session": absolute(args.mount)})
                job = call(c, method, **where, dry_run=dry_run, new_index=new_index,
                           **params)
                doc = run_job(c, job)
            elif image is not None and index is not None:
                with own_mounter(dry_run) as mounter:
                    from servicing.transaction import service

                    with status_line(not args.json) as line:
                        doc = service(image, index, make, new_index=new_index,
                                      dry_run=dry_run, progress=line, mounter=mounter,
                                      reads=reads).to_json()
            else:
                from servicing.transaction import service_mount

                change = make()
                with status_line(not args.json) as line:
                    doc = service_mount(args.mount, change, dry_run=dry_run,
                                        progress=line).to_json()
    except (ServicingFailed, DaemonRefused) as e:
        if not e.output:
            raise
        print(f"imagefs: {e.message()}", file=sys.stderr)
        for ln in e.output.splitlines()[-40:]:
            print(f"  | {one_line(ln)}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print_json(doc)
    else:
        (show or show_outcome)(doc)
    return 0


# servicing.transaction.Mounter (not imported for it: the CLI imports servicing later)
Mounter = Callable[[str, int, str, Sequence[str]], "PendingMount"]


@contextmanager
def own_mounter(dry_run: bool) -> Iterator[Mounter | None]:
    """The mounts of a transaction run here (no daemon): made by a fork server forked from
    this process now, before it imports and plans anything (daemon.forked_server), so that
    the imports a mount needs overlap the planning.  Its mounts are tied to this process
    and are volatile sessions, as servicing.transaction's own would be; the server ends
    with the block.  None for a dry run, which mounts nothing."""
    if dry_run:
        yield None
        return
    from daemon.forked_server import fork_server

    started = fork_server()  # first: the server's imports start now, on the other CPU
    from daemon.forkserver import MountForkServer, MountRequest

    server = MountForkServer(fork_server, started)

    def mount(image: str, number: int, mountpoint: str, reads: Sequence[str]
              ) -> PendingMount:
        return server.begin(MountRequest(image=os.path.abspath(image), index=str(number),
                                         mountpoint=mountpoint, writable=True,
                                         tied_to=os.getpid(), volatile=True,
                                         warm=list(reads)))

    try:
        yield mount
    finally:
        server.close(wait=False)  # it ends at its socket's end, or with this process


def show_outcome(doc: dict[str, Any]) -> None:
    """The plan of each index, then what became of it."""
    for item in doc["indices"]:
        print(f"index {item['index']} ({one_line(item['name'])}):")
        plan = item["plan"]
        for ln in plan.get("lines") or ["nothing to do"]:
            print(f"  {one_line(ln)}")
    say_committed(doc)


def say_committed(doc: dict[str, Any]) -> None:
    """The last line of an outcome: a dry run, left to the caller's commit, committed (in
    which indices, with how much new content), or nothing changed."""
    if doc["dry_run"]:
        print("Dry run: nothing was changed.")
    elif doc.get("mount"):
        print(f"Done in {doc['mount']}; commit it with: imagefs commit {doc['mount']}")
    elif doc["committed"]:
        changed = [i for i in doc["indices"] if (i.get("commit") or {}).get("changed")]
        names = ", ".join(f"{i['commit']['index']} ({one_line(i['commit']['name'])})"
                          for i in changed)
        new = sum(int(i["commit"].get("new_bytes") or 0) for i in changed)
        print(f"Committed index{'es' if len(changed) > 1 else ''} {names} in one commit. "
              f"New content: {human(new)}.")
    else:
        print("Nothing changed.")
