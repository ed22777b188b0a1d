"""The health.* methods (DISM /ScanHealth, /CheckHealth, /RestoreHealth), wrapping
servicing.health: scan and restore run the image's own dpkg as root in a container (jobs,
root only); check answers at once from the recorded scan."""

from __future__ import annotations

from typing import Any

from .access import DIRECTORY, IMAGE, READ, check_path, path_param
from .calls import history_who, in_thread_as, job_answer
from .jobs import JobContext
from .rpc import Call, method, optional, required
from .servicing_jobs import (
    SERVICING,
    JobSteps,
    fork_server_mounter,
    only_root,
    publishing,
    where,
)

INDEX = (int, str)


@method("health.scan", image=optional(str), index=optional(*INDEX), session=optional(str),
        subscribe=optional(bool, default=False))
async def scan(call: Call, image: str | None, index: int | str | None, session: str | None,
               subscribe: bool) -> Any:
    """Job: check one index (or the caller's writable `session`) as `imagefs health scan`:
    its chunks, its package files against their md5sums (the image's own `dpkg --verify`),
    changed conffiles apart as drift, packages in a bad state (`dpkg --audit`), pending
    first-boot items.  The result is the report; an index's is recorded for health.check.
    Root only."""
    from servicing.health import scan as scan_index
    from servicing.health_scan import scan_mount

    only_root(call, "health.scan")
    call.daemon.check_accepting()
    path, spec = await where(call, "health.scan", image, index, session, READ)
    mounter = fork_server_mounter(call)

    def work(ctx: JobContext) -> dict[str, Any]:
        steps = JobSteps(ctx)
        report = (scan_mount(spec, steps) if path is None
                  else scan_index(path, spec, steps, mounter))
        return report.to_json()

    params = {"image": image, "index": index, "session": session}
    job = call.daemon.jobs.submit("health.scan", params, call.peer.uid, work)
    return job_answer(call, job, subscribe)


@method("health.check", image=required(str), index=required(*INDEX))
async def check(call: Call, image: str, index: int | str) -> Any:
    """What the last scan of the index found, at once (`imagefs health check`): healthy,
    damaged, or unknown (never scanned, or changed since)."""
    from servicing.health import check as check_index

    path = await check_path("image", image, call.peer, READ, IMAGE)
    answer = await in_thread_as(call.peer, check_index, path, str(index))
    return answer.to_json()


@method("health.restore", source=optional(str), debs=optional(str), **SERVICING)
async def restore(call: Call, source: str | None, debs: str | None, image: str | None,
                  index: int | str | None, session: str | None, dry_run: bool,
                  new_index: str | None, subscribe: bool) -> Any:
    """Job: put back damaged or missing package files from `source` ("IMAGE2:INDEX2") or
    the package files in the folder `debs`, scan again and commit, as `imagefs health
    restore`.  Root only."""
    from servicing.health_restore import restore as restore_index
    from servicing.health_restore import restore_mount

    only_root(call, "health.restore")
    call.daemon.check_accepting()
    if source is not None:
        src_image = source.rpartition(":")[0] or source
        path_param("source", src_image)
        await check_path("source", src_image, call.peer, READ, IMAGE)
    if debs is not None:
        await check_path("debs", debs, call.peer, READ, DIRECTORY)
    path, spec = await where(call, "health.restore", image, index, session)
    params = {"image": image, "index": index, "session": session, "source": source,
              "debs": debs, "dry_run": dry_run, "new_index": new_index}
    who = history_who(call, "health.restore", params)
    mounter = fork_server_mounter(call)

    def work(ctx: JobContext) -> dict[str, Any]:
        steps = JobSteps(ctx)
        if path is None:
            outcome = restore_mount(spec, source=source, debs=debs, dry_run=dry_run,
                                    progress=steps)
        else:
            outcome = restore_index(path, spec, source=source, debs=debs,
                                    new_index=new_index, dry_run=dry_run, who=who,
                                    progress=steps, publishing=publishing(ctx),
                                    mounter=mounter)
        return outcome.to_json()

    job = call.daemon.jobs.submit("health.restore", params, call.peer.uid, work,
                                  lock_key=path or spec)
    return job_answer(call, job, subscribe)
