"""Read-only mounts: an index served by FUSE from a process of its own.

Owns the inode tree a mount serves (tree.py: numbering, lookups, listings over an
IndexView), the pyfuse3 adapter (fuse.py), filling the kernel's page cache ahead of
readers (prefill.py), the C shim beneath pyfuse3 (_fuseshim.c; shim.py
checks it is a version it knows, see docs/shim.md), the kernel's mount table, processes
and peers (kernel.py), mount records (registry.py), `-o` options (options.py) and the
mount process's life: fork, ready, detach (process.py).

May import: imagefs.format, the operations on whole images (imagefs.image) and
imagefs.errors / imagefs.places.  Never imagefs.session: writable mounts build on this
package, not the other way round.
"""
