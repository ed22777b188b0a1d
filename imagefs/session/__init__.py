"""Writable mounts: sessions, their staging, the copy-on-write tree and commit.

Owns a session's lifecycle (lifecycle.py: create, load, commit, discard; its records on
disk: info.py; committing one from any process: commit_client.py), its staging area
on local disk (staging.py: SQLite rows and sparse data files; ranges.py), the writable tree
over a read-only one (tree.py, built by concern: reading.py, changes.py, content.py,
attributes.py with acl.py, namespace.py), writing the changes into the image (commit.py),
the writable pyfuse3 adapter (fuse.py, fuse_dirs.py), the control socket a mount process
answers commit and discard on (control.py: protocol and client; control_server.py) and
mounts as an admin sees both kinds
(mounts.py).

May import: imagefs.mount, imagefs.format, the operations on whole images and
imagefs.errors / imagefs.places.  Never the daemon, servicing or the CLI.
"""
