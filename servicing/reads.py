"""What the image's programs read at every run, named so that a transaction's mount has
it in its caches when they run: read there by the mount's fork server while the verb plans
(servicing.transaction.Change.reads, imagefs.mount.warm).  A module without imports: the
CLI names it before it imports anything else.

Paths in the image; a symlink is never followed, so both layouts of /usr are named.
"""

# dpkg's database and configuration, and the programs dpkg starts with their libraries:
# `package add` of hello, its dpkg 108 -> 90 ms.
DPKG_READS = (
    "var/lib/dpkg/status", "var/lib/dpkg/available", "var/lib/dpkg/arch",
    "var/lib/dpkg/diversions", "var/lib/dpkg/statoverride", "var/lib/dpkg/triggers/*",
    "var/lib/dpkg/info/*.list", "etc/dpkg/dpkg.cfg", "etc/dpkg/dpkg.cfg.d/*",
    "etc/ld.so.cache", "etc/passwd", "etc/group", "etc/nsswitch.conf",
    *(f"{d}/{p}" for d in ("usr/bin", "bin") for p in (
        "dpkg", "dpkg-deb", "dpkg-split", "dpkg-query", "dpkg-trigger", "tar", "rm",
        "dash")),
    *(f"{d}/*-linux-*/{lib}" for d in ("usr/lib", "lib") for lib in (
        "ld-linux*.so.*", "libc.so.6", "libmd.so.*", "libselinux.so.*", "libpcre2-8.so.*",
        "libzstd.so.*", "liblzma.so.*", "libbz2.so.*", "libz.so.*", "libacl.so.*")),
)
