"""Health of an index, the public face (DISM /ScanHealth, /CheckHealth, /RestoreHealth).

`scan` looks at an index (servicing.health_scan: its chunks, its package files with the
image's own dpkg --verify, conffile drift, dpkg --audit, pending first-boot items) and
records the report as the index's last scan; `check` answers from that record at once,
reading nothing of the image but its commit record; servicing.health_restore puts back
what a scan found damaged.

Records live in state_dir()/health/, one JSON file per index, keyed by the image's uuid and
the index name; each scan in it holds the index's root and digest at the time of the scan.
When none was made of the index as it is now, the index changed since (or was never
scanned) and check says so.  The scans of the last few states are kept: copies of an image
file share its uuid, and one copy's scan does not push out another's.  The digest tells
whether a scan speaks of the same tree, not whether a copy's own chunks are sound (scan
the copy).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from imagefs.image import Image
from imagefs.places import state_dir

from .health_scan import RECORD_FORMAT, ScanReport, one_index, scan_index
from .transaction import Mounter, Progress

# health check's exit codes; scan's are the first two.
EXIT_HEALTHY, EXIT_DAMAGED, EXIT_UNKNOWN = 0, 1, 3
KEEP = 8  # states of an index whose scans are kept


def scan(image_path: str, index_spec: str, progress: Progress | None = None,
         mounter: Mounter | None = None) -> ScanReport:
    """Scan an index and record the report as its last scan."""
    report = scan_index(image_path, index_spec, progress, mounter)
    save(report)
    return report


def exit_code(report: ScanReport) -> int:
    return EXIT_HEALTHY if report.healthy else EXIT_DAMAGED


def health_dir() -> str:
    return os.path.join(state_dir(), "health")


def record_path(uuid: str, name: str) -> str:
    """The file of an index's last scan: the image's uuid and the index name (hashed: a
    name may hold any character)."""
    key = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(health_dir(), f"{uuid}-{key}.json")


def save(report: ScanReport) -> str:
    """Record report as its index's last scan, atomically (a reader sees the old record or
    the new one).  The scans of the last KEEP other states of the index stay beside it (a
    copy of the image, or a state rolled back to, is answered for too)."""
    if report.mount is not None:
        raise ValueError("a scan of a mount describes no index")
    path = record_path(report.uuid, report.name)
    older = [r for r in _scans(report.uuid, report.name)
             if (r.get("root"), r.get("digest")) != (report.root, report.digest)]
    doc = {"format": RECORD_FORMAT, "uuid": report.uuid, "name": report.name,
           "scans": [report.to_json(), *older[:KEEP - 1]]}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _scans(uuid: str, name: str) -> list[dict[str, Any]]:
    """The recorded scans of the index, newest first ([] if none, or unreadable)."""
    try:
        with open(record_path(uuid, name)) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return []
    if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or \
            doc.get("uuid") != uuid or doc.get("name") != name:
        return []
    scans = doc.get("scans")
    return [r for r in scans if isinstance(r, dict)] if isinstance(scans, list) else []


def load(uuid: str, name: str, root: int | None = None, digest: str | None = None
         ) -> ScanReport | None:
    """The last scan recorded for the index (of the state root and digest name, when
    given); None if none."""
    for doc in _scans(uuid, name):
        if root is None or (doc.get("root"), doc.get("digest")) == (root, digest):
            try:
                return ScanReport.from_json(doc)
            except (TypeError, KeyError, ValueError):
                return None
    return None


@dataclass
class CheckAnswer:
    """health check's answer: healthy, damaged, never-scanned, or changed (since the last
    scan), with the last scan when there is one."""

    image: str
    index: int
    name: str
    status: str
    exit_code: int
    message: str
    scan: ScanReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "index": self.index, "name": self.name,
                "status": self.status, "exit_code": self.exit_code, "message": self.message,
                "counts": self.scan.counts() if self.scan else None,
                "scan": self.scan.to_json() if self.scan else None}


def check(image_path: str, index_spec: str) -> CheckAnswer:
    """Answer from the index's last recorded scan (DISM /CheckHealth)."""
    image_path = os.path.abspath(image_path)
    with Image.open(image_path) as img:
        uuid = img.file.header.uuid.hex()
        number, entry = img.select(one_index(index_spec))
    last = load(uuid, entry.name, entry.root, entry.digest) or load(uuid, entry.name)

    def answer(status: str, code: int, message: str) -> CheckAnswer:
        return CheckAnswer(image_path, number, entry.name, status, code, message, last)

    if last is None:
        return answer("never-scanned", EXIT_UNKNOWN,
                      "no scan recorded for this index: run `imagefs health scan`")
    if (last.root, last.digest) != (entry.root, entry.digest):
        return answer("changed", EXIT_UNKNOWN,
                      f"the index changed since its last scan ({last.scanned}); run "
                      "`imagefs health scan` again")
    if last.healthy:
        return answer("healthy", EXIT_HEALTHY, f"healthy at its last scan ({last.scanned})")
    return answer("damaged", EXIT_DAMAGED, f"damaged at its last scan ({last.scanned})")


def recorded_or_fresh(image_path: str, index_spec: str, progress: Progress | None = None,
                      mounter: Mounter | None = None) -> ScanReport:
    """The index's last scan if it was made of the index as it is now, else a new one
    (recorded)."""
    answer = check(image_path, index_spec)
    if answer.scan is not None and answer.status in ("healthy", "damaged"):
        return answer.scan
    return scan(image_path, str(answer.index), progress, mounter)
