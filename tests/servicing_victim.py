"""A servicing verb for tests of the transaction itself: `python servicing_victim.py IMAGE
INDEX [--fail-in N] [--dry-run] [--slow SECONDS]` writes /etc/imagefs-victim (and removes
/etc/motd) in each chosen index, in the image's container, then commits them in one
transaction; --fail-in N fails in index N.  Prints the outcome as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from imagefs.errors import Error
from servicing.roots import Root
from servicing.runner import run
from servicing.transaction import Progress, Refused, ServicingFailed, Target, service


@dataclass
class VictimPlan:
    status_bytes: int

    def empty(self) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        return {"status_bytes": self.status_bytes}

    def lines(self) -> list[str]:
        return ["write /etc/imagefs-victim", "remove /etc/motd"]


@dataclass
class Victim:
    fail_in: int = 0
    slow: float = 0.0
    verb: str = "test victim"

    def arguments(self) -> dict[str, Any]:
        return {"fail_in": self.fail_in}

    def plan(self, root: Root) -> VictimPlan:
        status = root.read("/var/lib/dpkg/status")
        if status is None:
            raise Refused("no dpkg database")
        return VictimPlan(len(status))

    def apply(self, target: Target, plan: Any, progress: Progress) -> dict[str, Any]:
        script = (f"sleep {self.slow}; echo {target.index} > /etc/imagefs-victim; "
                  "rm -f /etc/motd; echo from the container")
        if target.index == self.fail_in:
            script = "echo about to fail; echo oops >&2; exit 3"
        out = run(target.root, ["sh", "-c", script])
        if out.returncode != 0:
            raise ServicingFailed(f"the script exited {out.returncode}",
                                  (out.stdout + out.stderr).decode(errors="replace"))
        time.sleep(self.slow)
        return {"wrote": "/etc/imagefs-victim"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("index")
    p.add_argument("--fail-in", type=int, default=0)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--new-index")
    a = p.parse_args()
    try:
        outcome = service(a.image, a.index, Victim(a.fail_in, a.slow), dry_run=a.dry_run,
                          new_index=a.new_index)
    except ServicingFailed as e:
        print(json.dumps({"error": e.message(), "output": e.output}))
        return e.exit_code
    except Error as e:
        print(f"victim: {e.message()}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(outcome.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
