"""The generalize operations: each strips one kind of machine identity (or one machine's
leftovers) from an index, in the spirit of virt-sysprep's operations (whose names they
take where they do the same).

An Operation is a name, one line saying what it does, whether it runs by default, the
paths it looks at (for --list and the docs) and plan(planner), which records exact actions
through a servicing.generalize_plan.Planner.  Every operation works only on what exists,
never follows a symlink (a symlink is removed as itself), and leaves alone, with a note,
what it will not touch.  OPERATIONS is in the order they run; machine-id is always last.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

from imagefs.errors import Refused

from . import firstboot
from .generalize_plan import Planner
from .generalize_tree import DIR, FILE, LINK, Node, join, real_dir, shown

MACHINE_ID = "/etc/machine-id"
DBUS_MACHINE_ID = "/var/lib/dbus/machine-id"
UNINITIALIZED = b"uninitialized\n"  # systemd: the next boot is the first, a new id is made
PRESET_DIR = "/etc/systemd/system-preset"
PRESET = f"{PRESET_DIR}/00-imagefs-generalize.preset"
PRESET_TEXT = b"""\
# Placed by `imagefs generalize` (operation machine-id) for the first boot only: systemd
# then enables every unit its presets do not disable (preset-all); this keeps every unit
# as the image has it.  The first-boot queue removes this file after that boot.
disable *
"""
PRESET_ITEM = "drop-first-boot-preset"
PRESET_SCRIPT = f"""#!/bin/sh
# Queued by `imagefs generalize` (operation machine-id): systemd has applied its
# first-boot presets; the preset file that kept the units as they were goes.
rm -f {PRESET}
""".encode()
# ... and its directory, when generalize made it
PRESET_DIR_SCRIPT = PRESET_SCRIPT + f"rmdir {PRESET_DIR} 2>/dev/null || :\n".encode()
HOSTNAME = "/etc/hostname"
NEW_HOSTNAME = b"localhost\n"
HOSTS = "/etc/hosts"
SMALL = 1 << 20  # bytes read of a configuration file
SSH_KEY = re.compile(r"ssh_host_.+_key(\.pub|-cert\.pub)?\Z", re.S)
SSH_ITEM = "ssh-host-keys"
SSH_SCRIPT = b"""#!/bin/sh
# Queued by `imagefs generalize` (operation ssh-hostkeys): this machine's own SSH host
# keys, made at its first boot before ssh.service starts.
set -e
ssh-keygen -A
"""
HISTORIES = (".bash_history", ".zsh_history", ".zhistory", ".histfile", ".sh_history",
             ".ash_history", ".history", ".python_history", ".lesshst", ".viminfo",
             ".mysql_history", ".psql_history", ".sqlite_history", ".node_repl_history",
             ".rediscli_history", ".wget-hsts", ".local/share/fish/fish_history")
# Login accounting files: emptied, not removed (their owner and mode matter to login).
ACCOUNTING = ("wtmp", "btmp", "lastlog", "faillog")
JOURNAL = "/var/log/journal"
MACHINE_DIR = re.compile(r"[0-9a-f]{32}(\..*)?\Z", re.S)  # journal/<machine-id>[.something]
# (directory, names removed, those names for --list)
DHCP = (("/var/lib/dhcp", re.compile(r"dhclient.*\Z", re.S), "dhclient*"),
        ("/var/lib/dhclient", re.compile(r".*\Z", re.S), "*"),
        ("/var/lib/dhcpcd", re.compile(r".*\.lease6?\Z", re.S), "*.lease, *.lease6"),
        ("/var/lib/NetworkManager", re.compile(r".*\.lease\Z|dhclient.*\.leases?\Z", re.S),
         "*.lease, dhclient*.lease(s)"))
SEEDS = ("/var/lib/systemd/random-seed", "/var/lib/urandom/random-seed",
         "/var/lib/systemd/credential.secret")
BACKUPS = tuple(f"/etc/{n}-" for n in ("passwd", "shadow", "group", "gshadow", "subuid",
                                        "subgid"))
CRASH = ("/var/crash", "/var/lib/systemd/coredump", "/var/lib/apport/coredump")
PERSISTENT_NET = ("/etc/udev/rules.d/70-persistent-net.rules",)


@dataclass(frozen=True)
class Operation:
    name: str
    description: str
    default: bool
    paths: tuple[str, ...]
    plan: Callable[[Planner], None]


def _files(p: Planner, paths: tuple[str, ...]) -> None:
    """Remove each of paths that is a file or a symlink."""
    for path in paths:
        found = p.tree.node(path)
        if found is None:
            continue
        if found.kind in (FILE, LINK):
            p.remove(path, found)
        else:
            p.note(f"{shown(path)} is a {found.kind}, not a file")


def plan_ssh_hostkeys(p: Planner) -> None:
    for name in p.tree.names("/etc/ssh"):
        if SSH_KEY.match(name):
            _files(p, (join("/etc/ssh", name),))
    if "sshd" not in (p.root.names("/usr/sbin") or []):
        return
    queued = [i for i in firstboot.pending(p.root) if i.name == SSH_ITEM]
    if queued:
        p.note(f"new host keys are already queued for the first boot (item "
               f"{queued[0].id}-{SSH_ITEM})")
    elif not firstboot.has_systemd(p.root):
        if p.op.actions:
            raise Refused("ssh-hostkeys: the image has sshd but no systemd: nothing would "
                          "make new host keys at its first boot; leave the keys with "
                          "--operations=-ssh-hostkeys")
    else:
        p.queue(SSH_ITEM, SSH_SCRIPT, "at the first boot, before ssh.service starts")


def plan_hostname(p: Planner) -> None:
    found = p.tree.node(HOSTNAME)
    if found is None:
        return
    if found.kind not in (FILE, LINK):
        p.note(f"{HOSTNAME} is a {found.kind}")
        return
    data = p.tree.read(HOSTNAME, SMALL) if found.kind == FILE else None
    if data == NEW_HOSTNAME:
        return
    p.write(HOSTNAME, found, NEW_HOSTNAME)
    lines = (data or b"").decode(errors="replace").split()
    old = lines[0] if lines else ""
    if old and old != "localhost":
        _hosts(p, old)


def _hosts(p: Planner, old: str) -> None:
    """/etc/hosts without the old name (short, full, and the full names it starts)."""
    found = p.tree.node(HOSTS)
    data = p.tree.read(HOSTS, SMALL) if found is not None and found.kind == FILE else None
    if found is None or data is None:
        return
    short = old.split(".")[0]

    def named(token: str) -> bool:
        if token == "localhost" or token.startswith("localhost."):
            return False  # localhost.localdomain as a hostname: localhost stays
        return token in (old, short) or token.startswith(short + ".")

    out = []
    for line in data.decode(errors="surrogateescape").splitlines(keepends=True):
        body, hash_, comment = line.rstrip("\n").partition("#")
        words = body.split()
        if len(words) >= 2 and any(named(w) for w in words[1:]):
            kept = [w for w in words[1:] if not named(w)]
            if not kept:
                continue
            line = f"{words[0]}\t{' '.join(kept)}" + (f" {hash_}{comment}" if hash_ else "")
            line += "\n"
        out.append(line)
    new = "".join(out).encode(errors="surrogateescape")
    if new != data:
        p.write(HOSTS, found, new)


def homes(p: Planner) -> list[str]:
    """Every user's home in the image, as the real directory it leads to (its symlinks
    resolved inside the image): the homes /etc/passwd names, /root and the directories
    in /home.  What is removed in them is never followed (a history that is a symlink is
    removed as the symlink)."""
    found = ["/root"]
    passwd = p.tree.read("/etc/passwd", 16 << 20) or b""
    for line in passwd.decode(errors="surrogateescape").splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[5].startswith("/"):
            found.append(fields[5])
    found += [join("/home", n) for n in p.tree.names("/home")]
    real = (real_dir(p.tree, home) for home in found)
    return list(dict.fromkeys(r for r in real if r is not None))


def plan_shell_history(p: Planner) -> None:
    for home in homes(p):
        _files(p, tuple(join(home, name) for name in HISTORIES))


def plan_ssh_userdir(p: Planner) -> None:
    for home in homes(p):
        path = join(home, ".ssh")
        node = p.tree.node(path)
        if node is not None and node.kind == DIR:
            p.clear(path)
            p.remove(path, node)
        elif node is not None:
            _files(p, (path,))


def plan_tmp_files(p: Planner) -> None:
    for base in ("/tmp", "/var/tmp"):
        p.clear(base)


def plan_logfiles(p: Planner) -> None:
    def keep(path: str, node: Node) -> bool:
        name = path.rsplit("/", 1)[1]
        if path.startswith(JOURNAL + "/") and MACHINE_DIR.match(path.split("/")[4]):
            return False  # a journal of the old machine-id: all of it goes
        if node.kind != FILE or node.size == 0:
            return True  # directories, symlinks, empty files: no log in them
        if name in ACCOUNTING:
            p.empty(path, node)
            return True
        return False

    p.clear("/var/log", keep=keep, owned_files="empty")


def _not_lock(path: str, node: Node) -> bool:
    return node.kind == DIR or path.endswith("/lock")


def plan_apt_cache(p: Planner) -> None:
    p.clear("/var/cache/apt", keep=_not_lock)


def plan_apt_lists(p: Planner) -> None:
    p.clear("/var/lib/apt/lists", keep=_not_lock)


def plan_dhcp(p: Planner) -> None:
    for base, names, _shown in DHCP:
        _files(p, tuple(join(base, n) for n in p.tree.names(base) if names.match(n)))


def plan_random_seed(p: Planner) -> None:
    _files(p, SEEDS)


def plan_passwd_backups(p: Planner) -> None:
    _files(p, BACKUPS)


def plan_cloud_init(p: Planner) -> None:
    p.clear("/var/lib/cloud", keep=lambda path, _n: path == "/var/lib/cloud/seed"
            or path.startswith("/var/lib/cloud/seed/"))


def plan_crash_data(p: Planner) -> None:
    for base in CRASH:
        p.clear(base)


def plan_persistent_net(p: Planner) -> None:
    _files(p, PERSISTENT_NET)


def plan_machine_id(p: Planner) -> None:
    found = p.tree.node(MACHINE_ID)
    if found is not None and found.kind in (FILE, LINK):
        if found.kind == LINK or p.tree.read(MACHINE_ID, SMALL) != UNINITIALIZED:
            p.write(MACHINE_ID, found, UNINITIALIZED)
    elif found is not None:
        p.note(f"{MACHINE_ID} is a {found.kind}")
    if found is not None and found.kind in (FILE, LINK):
        _first_boot_presets(p)
    dbus = p.tree.node(DBUS_MACHINE_ID)
    if dbus is not None and dbus.kind in (FILE, LINK) and posixpath.normpath(
            posixpath.join(posixpath.dirname(DBUS_MACHINE_ID), dbus.target)) != MACHINE_ID:
        p.relink(DBUS_MACHINE_ID, dbus, MACHINE_ID)


def _first_boot_presets(p: Planner) -> None:
    """At a first boot systemd enables every unit its presets do not disable (`systemctl
    preset-all`, enable-only): Debian's presets would turn on ssh.socket,
    systemd-networkd and units the admin disabled.  A preset file that disables all keeps
    the units as the image has them for that boot; the first-boot queue then removes it."""
    if not firstboot.has_systemd(p.root):
        return
    node = p.tree.node(PRESET)
    script = PRESET_SCRIPT
    if node is None:
        if p.tree.node(PRESET_DIR) is None:
            p.mkdir(PRESET_DIR)
            script = PRESET_DIR_SCRIPT
        p.create(PRESET, PRESET_TEXT)
    elif node.kind != FILE or p.tree.read(PRESET, SMALL) != PRESET_TEXT:
        p.note(f"{PRESET} is there and is not imagefs's: first-boot presets left to it")
        return
    if not any(i.name == PRESET_ITEM for i in firstboot.pending(p.root)):
        p.queue(PRESET_ITEM, script, "at the first boot, once systemd has applied its "
                "presets")


OPERATIONS = (
    Operation("ssh-hostkeys", "the SSH host keys: removed, and `ssh-keygen -A` queued for "
              "the first boot (before ssh.service) so that each clone makes its own",
              True, ("/etc/ssh/ssh_host_*_key", "/etc/ssh/ssh_host_*_key.pub",
                     "/etc/ssh/ssh_host_*_key-cert.pub"), plan_ssh_hostkeys),
    Operation("hostname", "the machine's name: /etc/hostname becomes `localhost`, and "
              "/etc/hosts forgets the old name", True, (HOSTNAME, HOSTS), plan_hostname),
    Operation("shell-history", "every user's shell and tool histories (homes from the "
              "image's /etc/passwd, /root and /home/*)", True,
              tuple(f"~/{h}" for h in HISTORIES), plan_shell_history),
    Operation("ssh-userdir", "every user's ~/.ssh (authorized_keys, known_hosts, keys); "
              "off by default: an image's authorized_keys are usually wanted", False,
              ("~/.ssh",), plan_ssh_userdir),
    Operation("tmp-files", "everything in /tmp and /var/tmp", True, ("/tmp/*", "/var/tmp/*"),
              plan_tmp_files),
    Operation("logfiles", "log files and the journal: /var/log's files removed (login "
              "accounting files emptied), the old machine's journal directory removed; "
              "directories stay", True, ("/var/log/**", f"{JOURNAL}/MACHINE-ID/"),
              plan_logfiles),
    Operation("apt-cache", "apt's package cache: downloaded .debs and pkgcache.bin", True,
              ("/var/cache/apt/**",), plan_apt_cache),
    Operation("apt-lists", "apt's package lists (`apt update` fetches them again)", True,
              ("/var/lib/apt/lists/**",), plan_apt_lists),
    Operation("dhcp-client-state", "DHCP leases of dhclient, dhcpcd and NetworkManager",
              True, tuple(f"{b}/{pattern}" for b, _r, pattern in DHCP),
              plan_dhcp),
    Operation("random-seed", "systemd's random seed and credential secret (clones must not "
              "share them)", True, SEEDS, plan_random_seed),
    Operation("passwd-backups", "the backups of passwd, shadow, group, gshadow, subuid and "
              "subgid (older accounts and password hashes)", True, BACKUPS,
              plan_passwd_backups),
    Operation("cloud-init", "cloud-init's state, as `cloud-init clean` (its seed stays), so "
              "that it runs again as on a new instance", True,
              ("/var/lib/cloud/* (not seed/)",), plan_cloud_init),
    Operation("crash-data", "crash dumps and core files", True, tuple(f"{c}/*" for c in CRASH),
              plan_crash_data),
    Operation("udev-persistent-net", "udev's persistent network names (tied to the old "
              "machine's MAC addresses)", True, PERSISTENT_NET, plan_persistent_net),
    Operation("machine-id", "the machine ID: /etc/machine-id says `uninitialized` (systemd "
              "treats the next boot as the first and makes a new ID), "
              "/var/lib/dbus/machine-id becomes a symlink to it; always last", True,
              (MACHINE_ID, DBUS_MACHINE_ID), plan_machine_id),
)
BY_NAME = {op.name: op for op in OPERATIONS}
