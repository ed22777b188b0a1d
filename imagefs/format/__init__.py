"""The image file: its on-disk layouts and everything that reads or writes them.

Owns the byte layouts (layout.py, the one place offsets are written), the container
(header, commit records, atomic publication by one final fsynced write), packs of
zstd-compressed chunks addressed by xxhash, metadata records, Merkle digests, reading an
index (view.py), writing one (writer.py) and content-defined chunking.

May import: imagefs.errors and imagefs.places only.  Knows nothing of mounts, sessions,
sockets or dpkg.
"""
