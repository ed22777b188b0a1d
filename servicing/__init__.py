"""Offline servicing of a Debian root: packages, health, first boot, drivers, features and
generalize.

Each operation is pure: given an image's index (read without mounting) or a root directory
(a writable mount, or a plain directory), it works on it and returns what it did.

- transaction.py: what every verb that changes an index runs in (plan, apply in writable
  sessions, check, one commit of every index or none); roots.py: what planning reads.
- runner.py: the image's own programs in a container rooted at the root (bubblewrap,
  no network, policy-rc.d 101, nothing left mounted).
- packages.py (list, add, remove), debs.py (a .deb, checked), resolver.py (the plan).
- health*.py (scan, check, restore); firstboot*.py (the first-boot queue in the image).
- features.py, feature_*.py (systemd units through the host's `systemctl --root`, with
  Debian's deb-systemd-helper state kept), roles.py (a role file: units and packages in
  one transaction).
- drivers.py, driver_*.py (kernel modules and firmware matched to hardware inventories,
  checked against each kernel of the index, depmod in the image's container).
- generalize*.py (Sysprep for Linux: named operations planned to the path, applied
  without following a symlink).

May import: the imagefs library (imagefs.image, imagefs.format, imagefs.session,
imagefs.mount, imagefs.errors).  Imported by the daemon (whose api_*.py wrap these
functions as methods) and the CLI; it never imports either (pyproject.toml
[tool.importlinter]).
"""
