"""What imagefs places in an image for its first-boot queue: the systemd unit and the runner
script it starts, kept here as constants so that they ship inside the Python package.

The runner is POSIX sh (an image need not have Python) using only what every Debian
system has (dash, coreutils, sed).  It is the whole of the queue's semantics at boot time:

- items are the directories queue/NNNN-NAME, run in the order of NNNN, each as root from /
  with stdin /dev/null, its script `run` executed directly (its #! line says by what);
- before an item runs, `started` is written and synced; its output goes to `output` (and,
  once it ended, to the journal, each line prefixed "  | ");
- when it ends, `result` (exit code, times, boot id, attempts) is written, synced, and the
  item's directory is renamed into done/ and synced: a finished item never runs again;
- an item found started but without a result was interrupted (a power cut, a kill): it
  runs again, its `attempts` counted and its output appended to under a marker line;
- an item found with a result but still in queue/ (power cut before the rename) is only
  filed into done/;
- a failing item does not stop the next ones; the runner exits 1 when any failed, so that
  the unit shows as failed (`systemctl --failed`, a "degraded" system) until the next boot.

The unit runs the runner only while the queue directory is not empty
(ConditionDirectoryNotEmpty): a boot with nothing queued starts nothing.
"""

from __future__ import annotations

BASE = "/var/lib/imagefs/firstboot"
QUEUE = f"{BASE}/queue"
DONE = f"{BASE}/done"
RUNNER_PATH = "/usr/lib/imagefs/firstboot"
UNIT_NAME = "imagefs-firstboot.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
WANTS_LINK = f"{WANTS_DIR}/{UNIT_NAME}"

UNIT = f"""\
# Placed here by imagefs (imagefs firstboot add, imagefs package add --defer-configure).
# Runs the items queued in {QUEUE} once each, in order, at boot;
# their results are kept in {DONE}.
# See `imagefs firstboot --help`.
[Unit]
Description=imagefs first-boot queue
ConditionDirectoryNotEmpty={QUEUE}
After=local-fs.target network.target
Before=getty.target systemd-user-sessions.service ssh.service display-manager.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={RUNNER_PATH}
StandardOutput=journal+console
StandardError=inherit
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
""".encode()

RUNNER = f"""\
#!/bin/sh
# imagefs first-boot runner, placed here by imagefs and started at boot by
# {UNIT_NAME} while {QUEUE} is not empty.
#
# Each item (queue/NNNN-NAME/run) runs once, in order of NNNN, as root from /, its output
# kept in its directory and shown in the journal.  `started` is written and synced before
# it runs, `result` after; then the item's directory moves to done/ (a rename, synced).
# An item started but without a result was interrupted (a power cut): it runs again.  An
# item with a result has finished: it never runs again.  A failed item does not stop the
# others; the runner then exits 1, so that the unit shows as failed.
set -u
queue={QUEUE}
done_dir={DONE}
failed=0
boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) || boot_id=unknown

now() {{ date -u +%Y-%m-%dT%H:%M:%SZ; }}
say() {{ printf 'imagefs-firstboot: %s\\n' "$*"; }}

retire() {{  # a finished item goes to done/, once its result is on disk
    sync
    if mv -T "$1" "$done_dir/${{1##*/}}"; then
        sync
    else
        say "${{1##*/}}: cannot move it to $done_dir (it has a result: it will not run again)"
        failed=1
    fi
}}

run_item() {{  # $1: the item's directory, $2: its id; sets code
    attempt=1
    if [ -f "$1/started" ]; then
        attempt=$(cat "$1/attempts" 2>/dev/null) || attempt=1
        case $attempt in ''|*[!0-9]*) attempt=1 ;; esac
        attempt=$((attempt + 1))
        say "$2: was interrupted before it finished; running it again (attempt $attempt)"
        printf '=== imagefs-firstboot: attempt %s (the previous one was interrupted) ===\\n' \\
            "$attempt" >>"$1/output"
    else
        : >"$1/output"
    fi
    start=$(now)
    printf '%s\\n' "$attempt" >"$1/attempts"
    printf 'started=%s\\nboot_id=%s\\nattempt=%s\\n' "$start" "$boot_id" "$attempt" \\
        >"$1/started"
    sync
    say "$2: running"
    chmod 0700 "$1/run" 2>/dev/null
    (cd / && IMAGEFS_FIRSTBOOT_ITEM=$2 && export IMAGEFS_FIRSTBOOT_ITEM && exec "$1/run") \\
        </dev/null >>"$1/output" 2>&1
    code=$?
    sed 's/^/  | /' "$1/output"
    printf 'exit=%s\\nstarted=%s\\nfinished=%s\\nboot_id=%s\\nattempts=%s\\n' \\
        "$code" "$start" "$(now)" "$boot_id" "$attempt" >"$1/result.new"
    sync
    mv -f "$1/result.new" "$1/result"
}}

mkdir -p "$done_dir"
for item in "$queue"/[0-9][0-9][0-9][0-9]-*; do
    [ -d "$item" ] || continue
    id=${{item##*/}}
    if [ -f "$item/result" ]; then
        say "$id: finished at an earlier boot; filing its result"
        retire "$item"
        continue
    fi
    if [ ! -f "$item/run" ]; then
        say "$id: no run script; skipped"
        continue
    fi
    run_item "$item" "$id"
    if [ "$code" -eq 0 ]; then
        say "$id: succeeded"
    else
        say "$id: failed with exit code $code (the next items run all the same)"
        failed=1
    fi
    retire "$item"
done
exit "$failed"
""".encode()
