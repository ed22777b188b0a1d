"""imagefs mount [--rw] IMAGE INDEX MOUNTPOINT: serve an index as a folder."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from ._common import add_json, print_json
from ._daemon import absolute, add_daemon_options, call, daemon_client, refuse_with
from ._store import add_read_options, open_image


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mount", help="mount an index as a folder (FUSE), read-only or writable (--rw)",
        description=textwrap.fill(
            "Mount INDEX of IMAGE at MOUNTPOINT, read-only unless --rw. The command returns "
            "once the mount is ready; a background process serves it until `imagefs "
            "unmount`. The folder shows exactly what was captured: owners, modes, times, "
            "hardlinks, xattrs, ACLs, holes. As root the mount serves every user "
            "(allow_other, with the kernel checking permissions) and keeps setuid files and "
            "device nodes working (suid, dev), so `chroot MOUNTPOINT` behaves like the real "
            "system. When an imagefs daemon listens, the mount is forked from its warm "
            "fork server (ready in a third of the time), still as you and still its own "
            "process; --no-daemon mounts from this command.", 79) + "\n\n" + textwrap.fill(
            "With --rw the mount is a session: changes are staged on local disk (copy-on-"
            "write, per chunk) until `imagefs commit` publishes them into the index (or a "
            "new one with --new-index) or `imagefs unmount --discard` drops them. A session "
            "survives a crash of its mount process: `imagefs mounts` shows it stale, "
            "`imagefs remount` brings it back, `imagefs cleanup` removes it.", 79),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""options for -o (comma-separated, -o may repeat):
  cache=SIZE      bound the cache of decompressed chunks (default: eight of the
                  file's largest packs, 10M; 66M for a --compact file)
  anything else   passed to FUSE: noatime, nosuid, nodev, noexec, allow_other, ...

examples:
  imagefs mount golden.imagefs 1 /mnt/golden
  imagefs mount golden.imagefs bookworm-web /mnt/web -o cache=1G
  imagefs mount golden.imagefs 2 /mnt/x --foreground   # logs to stderr; Ctrl-C unmounts
  imagefs mounts; imagefs unmount /mnt/golden
  imagefs mount --rw golden.imagefs 1 /mnt/edit        # a writable session
  dpkg --root=/mnt/edit -i hello.deb && imagefs unmount /mnt/edit --commit""")
    p.add_argument("image", metavar="IMAGE", help="the image file")
    p.add_argument("index", metavar="INDEX", help="index number (from 1) or name")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("--rw", action="store_true",
                   help="writable: open a session whose changes are committed or discarded")
    p.add_argument("--foreground", action="store_true",
                   help="serve in this process until unmounted or interrupted")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma-separated (see below)")
    add_json(p)
    add_daemon_options(p)
    add_read_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imagefs.store.client import is_store_url

    store = is_store_url(args.image)
    if store and args.rw:
        from imagefs.session.mounts import store_read_only

        raise store_read_only(args.image)
    if store and args.daemon and args.endpoint:
        refuse_with(args, "--endpoint (the daemon speaks to stores with its own endpoint "
                          "and credentials)")
    # Through a listening daemon a mount costs a fork of its warm process, not this
    # process's import of pyfuse3 and trio (most of a mount's time); this path imports
    # nothing heavy.  Writable mounts with -o are the mount command's own.  An index of a
    # store is mounted here, with your S3 credentials, unless --daemon insists (then the
    # daemon's).
    if not args.foreground and not (args.rw and args.options) and \
            (not store or args.daemon):
        with daemon_client(args) as c:
            if c is not None:
                if args.rw:
                    rec = session_record(call(
                        c, "sessions.open", image=absolute(args.image), index=args.index,
                        mountpoint=absolute(args.mountpoint)))
                else:
                    from imagefs.mount.options import parse_size
                    from imagefs.places import run_dir

                    where = ({"image": args.image, "cache_size": parse_size(args.cache_size),
                              **({"cache": absolute(args.cache)} if args.cache else {})}
                             if store else {"image": absolute(args.image)})
                    rec = call(c, "mounts.open", **where,
                               index=args.index, mountpoint=absolute(args.mountpoint),
                               options=args.options, run_dir=absolute(run_dir()))
                say_mounted(rec, args.json, foreground=False)
                return 0
    elif args.daemon:
        refuse_with(args, "--foreground, or -o with --rw (the daemon opens writable "
                          "sessions with default options)")

    from imagefs.mount.registry import MountRecord
    from imagefs.session.mounts import start

    def announce(rec: MountRecord) -> None:
        say_mounted(rec.to_json(), args.json, foreground=True)

    done = start(args.image, args.index, args.mountpoint, args.options,
                 foreground=args.foreground, announce=announce, writable=args.rw,
                 opener=(lambda: open_image(args)) if store else None)
    if not args.foreground:
        say_mounted(done.to_json(), args.json, foreground=False)
    return 0


def session_record(s: dict[str, Any]) -> dict[str, Any]:
    """A session the daemon opened, as a mount record (what `mount --json` prints)."""
    return {"image": s["image"], "index": s["index"], "name": s["name"],
            "mountpoint": s["mountpoint"], "pid": s["pid"], "mode": "rw",
            "started": s["created"], "log": "(the daemon's)", "state": s["state"],
            "session": s["session"], "staged_bytes": s["staged_bytes"]}


def say_mounted(rec: dict[str, Any], as_json: bool, foreground: bool) -> None:
    """rec: a MountRecord's JSON (from this process, or the daemon's answer)."""
    if as_json:
        print_json(rec)
    else:
        where = "" if foreground else f"; log {rec['log']}"
        session, mnt = rec.get("session"), rec["mountpoint"]
        how = f"writable (session {session})" if session else "read-only"
        print(f"Mounted index {rec['index']} ({rec['name']}) of {rec['image']} {how} at "
              f"{mnt} (pid {rec['pid']}{where}).")
        if not foreground and session:
            print(f"Commit with: imagefs commit {mnt}; end with: imagefs unmount "
                  f"{mnt} --commit (or --discard)")
        elif not foreground:
            print(f"Unmount with: imagefs unmount {mnt}")
    sys.stdout.flush()
