"""What the generalize tests share: a specialised bookworm-minbase index (one machine's
identity everywhere generalize looks), made once per test session, and how to read an
index's state.

The identity is given as a real machine would get it: the image's own `ssh-keygen -A` in
its container for the host keys, a machine ID, a hostname in /etc/hostname and
/etc/hosts, logs and a journal directory named after the machine ID, shell histories of
root and of a user from /etc/passwd, apt caches and lists, a DHCP lease, systemd's random
seed and credential secret, temporary files, cloud-init state (and its seed, which
stays), crash dumps, udev's persistent net rules; the passwd backups are there already.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from conftest import fixture_tree, mounted_rw, run_imagefs

from imagefs.errors import NoSuchPath
from imagefs.image import Image
from servicing.runner import run

MACHINE_ID = "5ee0c0ffee5ee0c0ffee5ee0c0ffee01"
HOSTNAME = "specialised-host"
ALICE = "alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
# Paths the identity puts in place (beyond the host keys ssh-keygen -A makes), each with
# its content, relative to the root.
IDENTITY_FILES: dict[str, bytes] = {
    "etc/hostname": f"{HOSTNAME}\n".encode(),
    "etc/hosts": (f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}.example.org {HOSTNAME}\n"
                  "::1\tlocalhost ip6-localhost ip6-loopback\n").encode(),
    "etc/machine-id": f"{MACHINE_ID}\n".encode(),
    "var/lib/dbus/machine-id": f"{MACHINE_ID}\n".encode(),
    "var/log/syslog": b"Dec  1 10:00:00 specialised-host kernel: booted\n" * 200,
    "var/log/auth.log": b"Dec  1 10:00:01 specialised-host sshd[1]: Accepted key\n" * 50,
    "var/log/apt/history.log": b"Start-Date: 2024-12-01  10:00:00\nCommandline: apt up\n",
    "var/log/wtmp": b"\x07" * 384,
    "var/log/dpkg.log.1": b"2024-12-01 10:00:00 status installed hello:amd64 2.10-3\n",
    f"var/log/journal/{MACHINE_ID}/system.journal": b"LPKSHHRH" + os.urandom(4096),
    f"var/log/journal/{MACHINE_ID}/user-1000.journal": b"LPKSHHRH" + os.urandom(2048),
    "root/.bash_history": b"ssh admin@10.0.0.1\nsudo cat /etc/shadow\n",
    "root/.lesshst": b".less-history-file:\n",
    "home/alice/.bash_history": b"mysql -u root -psecret\n",
    "home/alice/.python_history": b"import os\n",
    "home/alice/.local/share/fish/fish_history": b"- cmd: ls\n",
    "var/cache/apt/pkgcache.bin": os.urandom(8192),
    "var/cache/apt/srcpkgcache.bin": os.urandom(4096),
    "var/cache/apt/archives/hello_2.10-3_amd64.deb": os.urandom(2048),
    "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": b"Origin: Debian\n",
    "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages":
        b"Package: hello\n" * 100,
    "var/lib/dhcp/dhclient.eth0.leases": b"lease {\n  fixed-address 10.0.0.23;\n}\n",
    "var/lib/systemd/random-seed": os.urandom(512),
    "var/lib/systemd/credential.secret": os.urandom(32),
    "tmp/build/output.o": os.urandom(1024),
    "tmp/session.sock.txt": b"x",
    "var/tmp/cache.bin": os.urandom(1024),
    "var/lib/cloud/instances/i-0123/obj.pkl": os.urandom(256),
    "var/lib/cloud/data/instance-id": b"i-0123\n",
    "var/lib/cloud/seed/nocloud/user-data": b"#cloud-config\n",
    "var/crash/_usr_bin_app.0.crash": os.urandom(1024),
    "var/lib/systemd/coredump/core.app.1000.zst": os.urandom(1024),
    "etc/udev/rules.d/70-persistent-net.rules": b'SUBSYSTEM=="net", NAME="eth0"\n',
}
IDENTITY_LINKS = {"var/lib/cloud/instance": "/var/lib/cloud/instances/i-0123"}
# What generalize must leave: the cloud-init seed, the package-owned directories, the
# image's own logs that are not files (README symlink), the accounts.
KEPT = ("var/lib/cloud/seed/nocloud/user-data", "var/log/apt", "var/log/journal",
        "var/cache/apt/archives/partial", "var/lib/apt/lists/partial", "etc/passwd",
        "etc/shadow", "tmp", "var/tmp", "home/alice", "var/crash")


def give_identity(mnt: Path) -> None:
    """Make the root at mnt (a writable mount) one machine."""
    for rel, data in IDENTITY_FILES.items():
        path = mnt / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, target in IDENTITY_LINKS.items():
        (mnt / rel).symlink_to(target)
    with open(mnt / "etc/passwd", "a") as fh:
        fh.write(ALICE)
    os.chown(mnt / "home/alice", 1000, 1000)
    for key in (mnt / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    out = run(str(mnt), ["ssh-keygen", "-A"])
    assert out.returncode == 0, out.stderr
    assert len(list((mnt / "etc/ssh").glob("ssh_host_*_key"))) == 3


@functools.cache
def specialised_master() -> Path:
    """bookworm-minbase with one machine's identity, as index 1 ("specialised") of an
    image made once per test session (removed at its end).  Copy it before changing it."""
    where = Path(tempfile.mkdtemp(prefix="imagefs-generalize-"))
    atexit.register(shutil.rmtree, where, True)
    image = where / "specialised.imagefs"
    run_imagefs("capture", fixture_tree("bookworm-minbase"), image, "--name", "specialised")
    with mounted_rw(image, 1, where / "mnt"):
        give_identity(where / "mnt")
        run_imagefs("commit", where / "mnt")
    return image


def specialised_copy(dest: Path) -> Path:
    image = dest / "specialised.imagefs"
    shutil.copyfile(specialised_master(), image)
    return image


def content(image: Path, index: str, path: str) -> bytes | None:
    """The bytes of the file at path in the index (None if there is none)."""
    with Image.open(str(image)) as img:
        view = img.view(index)
        try:
            ino = view.lookup(path, follow=False)
        except NoSuchPath:
            return None
        return bytes(view.read(ino, 0, ino.size)) if ino.size else b""


def state(image: Path, index: str = "1") -> str:
    """'old' (specialised) or 'new' (generalized) for the index; fails on anything in
    between: a host key and the machine ID go together."""
    key = content(image, index, "/etc/ssh/ssh_host_ed25519_key")
    mid = content(image, index, "/etc/machine-id")
    history = content(image, index, "/root/.bash_history")
    if key is not None and mid == f"{MACHINE_ID}\n".encode() and history is not None:
        return "old"
    assert key is None and mid == b"uninitialized\n" and history is None, (key, mid)
    return "new"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
