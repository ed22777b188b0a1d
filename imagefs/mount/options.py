"""`-o` for mounts: which options are FUSE's and which are imagefs's own (cache=SIZE)."""

from __future__ import annotations

from imagefs.errors import UsageError

# Decompressed packs (~1 MiB each).  The kernel's page cache keeps what was read (free opens
# imply keep_cache), so this cache only has to hold a pack while its files are read, not
# the data read: 8 MiB reads the bookworm-web index with tar as fast as 256 MiB did, at a
# peak of 56 MB instead of 262 MB for the mount process (docs/cli.md, mount).
DEFAULT_CACHE = 8 << 20


def parse_options(specs: list[str], writable: bool = False) -> tuple[list[str], int]:
    """-o values → (FUSE options, pack cache bytes).  cache=SIZE is ours; `rw` and `ro`
    are --rw's business (writable mounts are sessions)."""
    fuse_opts: list[str] = []
    cache = DEFAULT_CACHE
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
