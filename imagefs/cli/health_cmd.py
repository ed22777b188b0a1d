"""imagefs health scan | check | restore: is an index intact, and put back what is not
(DISM /ScanHealth, /CheckHealth, /RestoreHealth /Source)."""

from __future__ import annotations

import argparse
from typing import Any

from imagefs.errors import UsageError, one_line

from ._common import print_json
from ._daemon import absolute, call, daemon_client, run_job
from ._servicing import add_target, say_committed, split_target, status_line

WORDS_HELP = ("IMAGE INDEX: one index of the image (a number or a name); scan and restore "
              "open a private writable session of it. --mount MNT: work in that writable "
              "mount (imagefs mount --rw) instead; restore then leaves the commit to you.")
EXITS = ("Exit codes: 0 healthy, 1 damage found, 2 usage, 3 not found (for check: no scan "
         "of the index as it is now), 4 bad or damaged image, 8 system error.")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "health", help="scan an index for damage, answer from the last scan, restore files",
        description="Is an index intact? `scan` checks the index's chunks, its package files "
                    "against their md5sums (the image's own dpkg --verify), conffile drift, "
                    "package states (dpkg --audit) and pending first-boot items, and records "
                    "the result; `check` answers from that record at once; `restore` puts "
                    "back damaged package files from another index or from .deb files.",
        epilog="example: imagefs health scan golden.imagefs web && imagefs health restore "
               "golden.imagefs web --source golden.imagefs:1")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    scan = actions.add_parser(
        "scan", help="check an index and record the result (DISM /ScanHealth)",
        description="Check one index: the chunks its files use (as verify does), every "
                    "package file against its package's md5sums (dpkg --verify, run with "
                    "the image's own dpkg in a container on a private writable session that "
                    "is discarded), changed conffiles (drift: shown, not damage), packages "
                    "in a bad state (dpkg --audit) and pending first-boot items. The result "
                    "is recorded for `health check`. With --mount MNT the files of that "
                    "writable mount are checked (and not recorded).",
        epilog=f"example: imagefs health scan golden.imagefs 2 --json. {EXITS}")
    add_target(scan, None, changes=False)
    _one_index_help(scan)
    scan.set_defaults(func=run_scan)
    check = actions.add_parser(
        "check", help="answer from the last scan at once (DISM /CheckHealth)",
        description="Say what the last scan of INDEX found, without scanning: healthy, "
                    "damaged (with the counts), never scanned, or changed since the last "
                    "scan (then scan again).",
        epilog=f"example: imagefs health check golden.imagefs web. {EXITS}")
    add_target(check, None, changes=False)
    _one_index_help(check)
    check.set_defaults(func=run_check)
    restore = actions.add_parser(
        "restore", help="put back damaged package files (DISM /RestoreHealth /Source)",
        description="Put back every damaged or missing package file of INDEX (found by its "
                    "last scan, or a new one) whose right content is known: the file at the "
                    "same path in --source IMAGE2:INDEX2 whose md5 is the one the damaged "
                    "index's md5sums record, or the member of the exact package version's "
                    ".deb in --debs DIR. Conffiles are left alone. The files are written in "
                    "a writable session, checked with dpkg --verify, and committed; from "
                    "another index of the same image no new content is stored. What cannot "
                    "be put back is listed, and the exit code is then 1.",
        epilog="example: imagefs health restore golden.imagefs 2 --source golden.imagefs:1. "
               "Exit codes: 0 all put back and healthy, 1 something could not be, 2 usage, "
               "3 no such image or index, 8 system error.")
    add_target(restore, None)
    restore.add_argument("--source", metavar="IMAGE2:INDEX2",
                         help="an index holding the right files (split at the last colon)")
    restore.add_argument("--debs", metavar="DIR",
                         help="a folder of .deb files of the installed package versions")
    _one_index_help(restore)
    restore.set_defaults(func=run_restore)


def _one_index_help(p: argparse.ArgumentParser) -> None:
    """Health works on one index: say so where add_target speaks of lists."""
    for action in p._actions:
        if action.dest == "words":
            action.help = WORDS_HELP


def _where(args: argparse.Namespace) -> dict[str, Any]:
    image, index, extra = split_target(args, 0)
    if extra:
        raise UsageError(f"unexpected words: {' '.join(extra)} (give IMAGE INDEX, or "
                         "--mount MNT)")
    if image is not None:
        return {"image": absolute(image), "index": index}
    return {"session": absolute(args.mount)}


def _ask(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    """The daemon's answer to method (following its job when it starts one), or None when
    this process should do the work."""
    with daemon_client(args) as c:
        if c is None:
            return None
        answer = call(c, method, **params)
        if isinstance(answer, dict) and "job" in answer and "state" in answer:
            return run_job(c, answer)
        return answer


def run_scan(args: argparse.Namespace) -> int:
    where = _where(args)
    doc = _ask(args, "health.scan", where)
    if doc is None:
        from servicing.health import scan
        from servicing.health_scan import scan_mount

        with status_line(not args.json) as line:
            report = (scan(where["image"], where["index"], line) if "image" in where
                      else scan_mount(where["session"], line))
        doc = report.to_json()
    if args.json:
        print_json(_shown(doc))
    else:
        show_scan(doc)
    return 0 if doc["healthy"] else 1


def run_check(args: argparse.Namespace) -> int:
    if args.mount is not None:
        raise UsageError("health check answers for an index: give IMAGE INDEX "
                         "(scan a mount with health scan --mount MNT)")
    where = _where(args)
    doc = _ask(args, "health.check", where)
    if doc is None:
        from servicing.health import check

        doc = check(where["image"], where["index"]).to_json()
    if args.json:
        print_json(_shown(doc))
    else:
        print(f"index {doc['index']} ({one_line(doc['name'])}): {doc['status']}: "
              f"{one_line(doc['message'])}")
        if doc.get("scan") and doc["status"] != "healthy":
            show_counts(doc["scan"], "  ")
    return int(doc["exit_code"])


def run_restore(args: argparse.Namespace) -> int:
    from servicing.health_restore import restore, restore_exit_code, restore_mount

    if args.source is None and args.debs is None:
        raise UsageError("give where the right files are: --source IMAGE2:INDEX2 and/or "
                         "--debs DIR")
    where = _where(args)
    source = _absolute_source(args.source)
    debs = absolute(args.debs) if args.debs is not None else None
    doc = _ask(args, "health.restore", {**where, "source": source, "debs": debs,
                                        "dry_run": args.dry_run,
                                        "new_index": args.new_index})
    if doc is None:
        with status_line(not args.json) as line:
            if "image" in where:
                outcome = restore(where["image"], where["index"], source=source, debs=debs,
                                  new_index=args.new_index, dry_run=args.dry_run,
                                  progress=line)
            else:
                outcome = restore_mount(where["session"], source=source, debs=debs,
                                        dry_run=args.dry_run, progress=line)
        doc = outcome.to_json()
    if args.json:
        print_json(_shown(doc))
    else:
        show_restore(doc)
    return restore_exit_code(doc)


def _absolute_source(source: str | None) -> str | None:
    """IMAGE2:INDEX2 with IMAGE2 made absolute (split at the last colon)."""
    if source is None:
        return None
    image, sep, index = source.rpartition(":")
    if not sep or not image or not index:
        raise UsageError(f"--source {source!r}: give IMAGE:INDEX (an image file and an "
                         "index of it, a number or a name)")
    return f"{absolute(image)}:{index}"


def _shown(doc: Any) -> Any:
    """doc with every string printable as UTF-8 (a path the image holds may not be)."""
    if isinstance(doc, str):
        return doc.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(doc, dict):
        return {_shown(k): _shown(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_shown(v) for v in doc]
    return doc


def _p(text: str) -> str:
    return one_line(_shown(text))


def show_scan(doc: dict[str, Any]) -> None:
    where = doc["mount"] or doc["image"]
    verdict = "healthy" if doc["healthy"] else "DAMAGED"
    print(f"index {doc['index']} ({_p(doc['name'])}) of {_p(where)}: {verdict}")
    show_counts(doc, "  ")
    if doc["chunk_problems"]:
        print(f"chunks: {len(doc['chunk_problems'])} problem(s) in the image file:")
        for what in doc["chunk_problems"]:
            print(f"  {_p(what)}")
        for path, why in doc["chunk_files"].items():
            print(f"  {why:<24} {_p(path)}")
    pk = doc["packages"]
    _files("damaged package files", pk["damaged"])
    _files("changed configuration files (drift, not damage)", pk["drift"])
    _states("packages in a bad state (dpkg --audit)", pk["bad_states"])
    _states("packages whose configuration waits for the first boot", pk["deferred"])
    for e in pk["errors"]:
        print(f"error: {_p(e)}")
    if doc["firstboot"]:
        print(f"pending first-boot items ({len(doc['firstboot'])}):")
        for item in doc["firstboot"]:
            print(f"  {_p(item['id'])}-{_p(item['name'])}  {item['state']}  "
                  f"{_p(item['origin'])}".rstrip())
    if pk["damaged"] and not doc["mount"]:
        print(f"Put back with: imagefs health restore {_p(doc['image'])} {doc['index']} "
              "--source IMAGE:INDEX (or --debs DIR)")


def show_counts(doc: dict[str, Any], indent: str) -> None:
    c = doc["counts"]
    print(f"{indent}{doc['chunks_checked']} chunks checked, {c['chunk_problems']} "
          f"problem(s); {c['damaged']} damaged package file(s) ({c['missing']} missing); "
          f"{c['drift']} changed conffile(s); {c['bad_states']} package(s) in a bad state; "
          f"{c['firstboot']} pending first-boot item(s)")


def _files(title: str, files: list[dict[str, Any]]) -> None:
    if not files:
        return
    print(f"{title} ({len(files)}):")
    for f in files:
        owners = ", ".join(f["packages"]) or "no package"
        print(f"  {f['problem']:<18} {_p(f['path'])}  ({_p(owners)})")


def _states(title: str, states: list[dict[str, str]]) -> None:
    if not states:
        return
    print(f"{title} ({len(states)}):")
    for s in states:
        print(f"  {_p(s['package'])}: {_p(s['problem'])}")


def show_restore(doc: dict[str, Any]) -> None:
    for item in doc["indices"]:
        print(f"index {item['index']} ({_p(item['name'])}):")
        for ln in item["plan"].get("lines") or ["nothing to restore"]:
            print(f"  {_p(ln)}")
        result = item.get("result")
        if result is not None:
            print(f"Put back {len(result['restored'])} file(s); "
                  + ("the index is healthy now." if result["healthy_after"] else
                     "the index is still damaged (see above)."))
            for c in result["not_restored"]:
                if c not in item["plan"].get("cannot", []):
                    print(f"  not restored: {_p(c['path'])}: {_p(c['why'])}")
    say_committed(doc)
