"""Jobs: long work that outlives the call (and the connection) that started it.

A method that may take long (capture, export, verify, commit) submits its work here and
answers at once with the job.  The work is a plain function run in a worker thread (the
imagefs library is synchronous; zstandard and the file I/O release the GIL).  It reports
progress through its JobContext, which is also where cancellation lands: `jobs.cancel`
sets a flag that the next progress report turns into JobCancelled inside the work, whose
own error handling then rolls back (a capture truncates what it appended, an export never
linked its file).  Once the work reaches its publish step it calls `ctx.publishing()`,
after which a cancel is refused: it is no longer possible to undo cleanly.

Jobs that write to the same image wait for each other in submission order (one lock per
image), so 100 queued commits run one by one instead of failing on the image's lock.

No user can take every job thread: a job runs in a thread of its owner's quota (`--threads`
minus one, at least one) and of the jobs' pool (`--threads`), so the jobs of a user whose
work is stuck (an image on a filesystem that does not answer, a lock another process
holds) leave a thread for everyone else's.  A job is `queued` until its thread starts.

On shutdown (stop()) every job that can be undone is cancelled; one that has not stopped
after a grace period (stuck in a read that does not return, or in a step that reports no
progress) is abandoned: its thread is left behind and ends with the daemon's process, as
in a crash, which the image format is made to survive (the committed state is untouched;
a capture's unpublished tail is cut by the image's next writer).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from imagefs.errors import Error

from .limits import Quotas, as_limiter
from .protocol import INTERNAL_ERROR, JOB_CANCELLED, RpcError

log = logging.getLogger("imagefs.daemon")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_FINISHED = 1000      # finished jobs remembered for jobs.get / jobs.list
PROGRESS_INTERVAL = 0.2   # at most this often a job.progress notification per job
SHUTDOWN_GRACE = 3.0      # seconds a cancelled job gets to stop before it is abandoned
CANCELLED_ERROR = {"code": JOB_CANCELLED, "message": "cancelled; nothing was changed"}
ABANDONED_ERROR = {"code": JOB_CANCELLED, "message": "cancelled: the daemon stopped and the work "
                   "did not stop in time; nothing was published"}

Subscriber = Callable[[str, dict[str, Any]], None]  # (notification method, params)


class JobCancelled(Exception):
    """cancelled by jobs.cancel"""


@dataclass(eq=False)
class Job:
    id: str
    method: str
    params: dict[str, Any]
    owner: int
    state: str = QUEUED
    done: int = 0
    total: int | None = None
    unit: str = "bytes"
    result: Any = None
    error: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    cancellable: bool = True
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # to abandon it
    subscribers: list[Subscriber] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"job": self.id, "method": self.method, "params": self.params,
                "owner": self.owner, "state": self.state,
                "progress": {"done": self.done, "total": self.total, "unit": self.unit},
                "result": self.result, "error": self.error, "created": self.created,
                "started": self.started, "ended": self.ended,
                "cancellable": self.cancellable and self.state not in FINISHED}

    def progress_params(self) -> dict[str, Any]:
        return {"job": self.id, "state": self.state, "done": self.done, "total": self.total,
                "unit": self.unit}


class JobContext:
    """What the work (in its thread) sees of its job."""

    def __init__(self, job: Job, manager: JobManager) -> None:
        self.job = job
        self._manager = manager
        self._last = 0.0

    def check(self) -> None:
        """Raise JobCancelled if a cancel was asked for and is still possible."""
        if self.job.cancel_requested.is_set() and self.job.cancellable:
            raise JobCancelled()

    def set_total(self, total: int, unit: str = "bytes") -> None:
        self.job.total, self.job.unit = total, unit
        self.check()

    def advance(self, n: int) -> None:
        self.job.done += n
        self.check()
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._manager.from_thread(self._manager.notify, self.job, "job.progress")

    def publishing(self) -> bool:
        """Past this point the work cannot be undone: refuse cancels from now on.
        False (and the work should stop) if a cancel came first."""
        with self._manager.cancel_lock:
            if self.job.cancel_requested.is_set():
                return False
            self.job.cancellable = False
            return True


class JobManager:
    """Runs jobs in its nursery; remembers the last KEEP_FINISHED finished ones."""

    def __init__(self, nursery: trio.Nursery, threads: int = 4,
                 per_user: int | None = None) -> None:
        self._nursery = nursery
        # Each owner's jobs share a quota of their own within the jobs' pool.
        self._quotas = Quotas(per_user if per_user is not None else max(1, threads - 1),
                              threads)
        self._token = trio.lowlevel.current_trio_token()
        self._ids = itertools.count(1)
        self._locks: dict[str, trio.Lock] = {}
        self.jobs: dict[str, Job] = {}
        self.cancel_lock = threading.Lock()
        self.accepting = True

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def submit(self, method: str, params: dict[str, Any], owner: int,
               work: Callable[[JobContext], Any], lock_key: str | None = None,
               cancellable: bool = True) -> Job:
        job = Job(f"j{next(self._ids)}", method, params, owner, cancellable=cancellable)
        self.jobs[job.id] = job
        self._forget_old()
        self._nursery.start_soon(self._run, job, work, lock_key, name=f"job {job.id}")
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job) -> bool:
        """Ask job to stop; False if it can no longer be (publishing, or over)."""
        with self.cancel_lock:
            if job.state in FINISHED or not job.cancellable:
                return False
            job.cancel_requested.set()
            return True

    def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            self.cancel(job)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Cancel every job that can be undone and wait for them, but for at most grace
        seconds: a job that has not stopped by then is abandoned.  Jobs that publish are
        waited for to their end."""
        self.accepting = False
        self.cancel_all()
        with trio.move_on_after(grace):
            for job in self.active:
                await job.finished.wait()
        for job in self.active:
            if job.cancel_requested.is_set():
                log.warning("job %s (%s) did not stop within %s s of its cancel; "
                            "abandoned", job.id, job.method, grace)
                job.scope.cancel()
        for job in self.active:
            await job.finished.wait()

    @property
    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state not in FINISHED]

    def notify(self, job: Job, method: str) -> None:
        if method == "job.progress" and job.state in FINISHED:
            return  # an abandoned thread that goes on: its job is over for everyone
        params = job.to_json() if method == "job.done" else job.progress_params()
        for send in list(job.subscribers):
            send(method, params)

    async def _run(self, job: Job, work: Callable[[JobContext], Any],
                   lock_key: str | None) -> None:
        lock = self._locks.setdefault(lock_key, trio.Lock()) if lock_key else None
        try:
            with job.scope:
                if lock is not None:
                    await lock.acquire()
                try:
                    if job.cancel_requested.is_set():
                        raise JobCancelled()
                    ctx = JobContext(job, self)
                    # Queued until a thread of the owner's quota and of the pool is free.
                    quota = self._quotas.for_uid(job.owner)
                    job.result = await trio.to_thread.run_sync(
                        self._in_thread, ctx, work, limiter=as_limiter(quota),
                        abandon_on_cancel=True)
                    job.state = DONE
                finally:
                    if lock is not None:
                        lock.release()
            if job.scope.cancelled_caught:  # abandoned (or, never started, cancelled)
                job.state = CANCELLED
                job.error = dict(ABANDONED_ERROR if job.started else CANCELLED_ERROR)
        except JobCancelled:
            job.state, job.error = CANCELLED, dict(CANCELLED_ERROR)
        except RpcError as e:
            job.state, job.error = FAILED, e.to_json()
        except Error as e:
            job.state, job.error = FAILED, RpcError.from_error(e).to_json()
        except OSError as e:
            job.state = FAILED
            job.error = RpcError.from_os_error(e).to_json()
        except Exception as e:  # a bug in the work: logged, the daemon goes on
            log.exception("job %s (%s) failed", job.id, job.method)
            job.state = FAILED
            job.error = RpcError(INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}"
                                 ).to_json()
        finally:
            if job.state not in FINISHED:  # the daemon itself was cancelled
                job.state = CANCELLED
            job.ended = time.time()
            job.cancellable = False
            if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(lock_key or "", None)  # nobody queued on this image
            job.finished.set()
            log.info("job %s %s: %s", job.id, job.method, job.state)
            self.notify(job, "job.done")

    def _in_thread(self, ctx: JobContext, work: Callable[[JobContext], Any]) -> Any:
        """The job's thread: the job runs from now on."""
        if ctx.job.cancel_requested.is_set():
            raise JobCancelled()
        self.from_thread(self._running, ctx.job)
        return work(ctx)

    def _running(self, job: Job) -> None:
        if job.state == QUEUED:
            job.state, job.started = RUNNING, time.time()
            self.notify(job, "job.progress")

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state in FINISHED]
        for j in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[j.id]
