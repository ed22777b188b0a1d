"""`-o` for mounts: which options are FUSE's and which are imagefs's own (cache=SIZE)."""

from __future__ import annotations

from imagefs.errors import UsageError
from imagefs.format.container import Header

# Decompressed packs (~1 MiB each).  The kernel's page cache keeps what was read (free opens
# imply keep_cache), so this cache only has to hold a pack while its files are read, not
# the data read: 8 MiB reads the bookworm-web index with tar as fast as 256 MiB did, at a
# peak of 48 MB instead of 262 MB for the mount process (docs/cli.md, mount).
DEFAULT_CACHE = 8 << 20
# ...and at least this many of the file's largest packs: a file of the compact profile
# stores content by kind and name, so a walk of the tree reads from several packs of
# 8 MiB at once (tar of bookworm-web: 11.5 s with 2 of them cached, 3.9 s with 8).
READ_PACKS = 8


def pack_cache(asked: int | None, header: Header, default: int | None = None) -> int:
    """The pack cache of a mount of a file with this header: cache=SIZE if given, else
    default (DEFAULT_CACHE) or READ_PACKS of its largest packs, whichever is larger."""
    if asked is not None:
        return asked
    return max(default or DEFAULT_CACHE, READ_PACKS * (header.pack_target + header.chunk_max))


def parse_options(specs: list[str], writable: bool = False
                  ) -> tuple[list[str], int | None]:
    """-o values → (FUSE options, pack cache bytes or None: pack_cache's default).
    cache=SIZE is ours; `rw` and `ro` are --rw's business (writable mounts are sessions)."""
    fuse_opts: list[str] = []
    cache: int | None = None
    for spec in specs:
        for opt in (o.strip() for o in spec.split(",")):
            if not opt:
                continue
            if opt.startswith("cache="):
                cache = parse_size(opt[6:])
            elif opt == ("ro" if writable else "rw"):
                raise UsageError(f"-o {opt}: this mount is "
                                 f"{'writable (--rw)' if writable else 'read-only'}; "
                                 f"{'drop --rw' if writable else 'use --rw for a session'}")
            elif opt in ("ro", "rw"):
                continue
            else:
                fuse_opts.append(opt)
    return fuse_opts, cache


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"{text!r}: not a size (examples: 512M, 2G)") from None
    if value < 1 << 20:
        raise UsageError(f"cache={text}: the chunk cache needs at least 1M")
    return value
