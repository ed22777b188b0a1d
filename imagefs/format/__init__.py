"""The image file: its on-disk layouts and everything that reads or writes them.

Owns the byte layouts (layout.py, the one place offsets are written), the container
(container.py: header, slots, frames, atomic publication by one final fsynced write), the
commit record (commit_record.py), packs of zstd-compressed chunks addressed by xxhash
(packs.py), metadata records (records.py), Merkle digests (digest.py), reading an index
(view.py), writing one (writer.py), content-defined chunking (chunking.py), the weighted
LRU the readers cache in (lru.py) and file primitives (files.py).

May import: imagefs.errors and imagefs.places only.  Knows nothing of mounts, sessions,
sockets or dpkg.
"""
