"""Runs jobs in background threads, keeps them running through faults, and cleans up after them.

One thread per running job (at most ``max_running_jobs`` at once; the rest wait in
state ``queued``). A thread first takes the job's Redis lock (a short TTL it keeps
renewing), so two orchestrators never run the same job; after a crash the lock simply
expires and the restarted orchestrator takes over, resuming from the job's checkpoint.

Faults: every Redis call retries through a short outage (``settings.connect``). A job
thread that still loses Redis does not record anything (it could not): it ends, and the
supervisor (:meth:`JobManager.sweep`, every ``supervise_interval`` s) launches it again
once its lock has expired, so it resumes from its checkpoint without a restart of the
orchestrator. The supervisor also fails jobs past their deadline, deletes jobs finished
longer ago than the retention time and prunes dead workers' heartbeat entries.

Stopping: ``shutdown()`` makes every round abort (RoundAborted: nothing of that round
is applied) and leaves the jobs ``running`` in Redis, so the next start-up resumes them.
Cancelling marks the job in Redis and records ``cancelling``: workers drop its blocks,
the thread stops at its next poll or progress event (also during model loading, at the
first event after it) and records ``cancelled``.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from typing import Any, Callable

import redis

from qsurgeon.client.errors import QsurgeonError, UsageError
from qsurgeon.client.schemas import Job, JobKind, JobState
from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.jobs import runner
from qsurgeon.server.api.jobs.store import JobStore
from qsurgeon.worker.queue.base import RoundRequest, RoundResult
from qsurgeon.worker.queue.control import QueueControl
from qsurgeon.worker.queue.producer import RedisQueue, RoundAborted

log = logging.getLogger(__name__)

_RUNNERS: dict[JobKind, Callable[..., tuple[dict[str, Any], list[str]]]] = {
    JobKind.prune: runner.run_prune_job,
    JobKind.solve: runner.run_solve_job,
}


class JobFailure(QsurgeonError):
    """The job cannot succeed honestly (too many failed blocks, past its deadline)."""


class JobStillRunning(UsageError):
    """A purge of a job that has not finished (answered 409)."""


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"/]+/)+([^\s'\"/]*)")


def public_message(message: str) -> str:
    """An error message fit for a client: server paths are cut to their last component."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "<path>", message)


class CountingQueue:
    """The job's queue, counting what happened to its blocks and enforcing its failure budget.

    ``max_failed_fraction`` 0 (the default) fails the job at the first round with a block
    that failed in every attempt; above 0 the job fails as soon as more than that fraction
    of the blocks sent so far failed (checked after each round and at the end). Counts start
    from the job's recorded progress, so a resumed job keeps its totals.
    """

    FIELDS = ("blocks_sent", "blocks_failed", "blocks_retried", "blocks_dead", "blocks_resent")

    def __init__(self, inner: RedisQueue, progress: "ProgressSink", max_failed_fraction: float,
                 instruments: Any = None) -> None:
        self.inner = inner
        self.progress = progress
        self.max_failed_fraction = max_failed_fraction
        self.instruments = instruments
        self.counts = {name: int(progress.current.get(name) or 0) for name in self.FIELDS}

    def run_round(self, request: RoundRequest) -> RoundResult:
        started = time.perf_counter()
        result = self.inner.run_round(request)
        if self.instruments is not None:
            self.instruments.observe_round(time.perf_counter() - started, result.solutions)
        counts = self.counts
        counts["blocks_sent"] += len(request.problems)
        counts["blocks_failed"] += len(result.failures)
        counts["blocks_retried"] += result.retried
        counts["blocks_dead"] += result.dead
        counts["blocks_resent"] += result.resent
        self.progress.record(counts)
        if result.failures and self.over_budget():
            reason = next(iter(result.failures.values()))
            raise JobFailure(f"{counts['blocks_failed']} of {counts['blocks_sent']} blocks failed (more than "
                             f"max_failed_fraction {self.max_failed_fraction:g}); first reason: {reason}")
        return result

    def over_budget(self) -> bool:
        sent, failed = self.counts["blocks_sent"], self.counts["blocks_failed"]
        return failed > self.max_failed_fraction * sent if sent else False


class JobManager:
    def __init__(self, config: ServiceConfig, client: redis.Redis, store: JobStore, instruments: Any = None) -> None:
        self.config = config
        self.redis = client
        self.store = store
        self.instruments = instruments
        self.owner = uuid.uuid4().hex
        self._stopping = threading.Event()
        self._slots = threading.Semaphore(config.max_running_jobs)
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self.control = QueueControl(client, config.queue)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> list[str]:
        """Resume every unfinished job and start the supervisor; returns the resumed ids."""
        resumed = []
        try:
            for job in self.store.unfinished():
                if job.state == JobState.cancelling:
                    self.store.update(job.id, state=JobState.cancelled, finished=time.time())
                    continue
                self.launch(job.id)
                resumed.append(job.id)
        except redis.RedisError as error:  # the supervisor resumes them once Redis answers
            log.warning("could not list unfinished jobs at start-up (%s)", error)
        if resumed:
            log.info("resuming %d unfinished job(s)", len(resumed))
        self._supervisor = threading.Thread(target=self._supervise, name="job-supervisor", daemon=True)
        self._supervisor.start()
        return resumed

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def launch(self, job_id: str) -> None:
        """Run the job in a thread here, unless one runs it already or this orchestrator runs
        no jobs (``max_running_jobs`` 0: an API-only replica; another orchestrator's
        supervisor picks the job up)."""
        if self.config.max_running_jobs == 0:
            return
        with self._lock:
            thread = self._threads.get(job_id)
            if thread is not None and thread.is_alive():
                return
            thread = threading.Thread(target=self._run, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True)
            self._threads[job_id] = thread
        thread.start()

    def running(self) -> int:
        return sum(thread.is_alive() for thread in self._threads.values())

    def _alive(self, job_id: str) -> bool:
        thread = self._threads.get(job_id)
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ the supervisor
    def _supervise(self) -> None:
        while not self._stopping.wait(self.config.supervise_interval):
            try:
                self.sweep()
            except redis.RedisError as error:
                log.warning("supervisor: Redis unreachable (%s); next sweep in %g s", error,
                            self.config.supervise_interval)
            except Exception:  # the supervisor must outlive any one bad record
                log.exception("supervisor sweep failed")

    def sweep(self) -> dict[str, list[str]]:
        """One pass: relaunch orphaned jobs, fail overdue ones, expire old ones, prune dead workers."""
        now = time.time()
        done: dict[str, list[str]] = {"relaunched": [], "overdue": [], "expired": []}
        for job in self.store.unfinished():
            if self._alive(job.id) or self.store.locked(job.id):
                continue  # running here, or in another orchestrator (or its lock has not expired yet)
            if job.state == JobState.cancelling:
                self.store.update(job.id, state=JobState.cancelled, finished=now)
            elif job.deadline is not None and now > job.deadline:
                self.store.update(job.id, state=JobState.failed, finished=now, error=self._deadline_reason())
                done["overdue"].append(job.id)
            else:
                self.launch(job.id)
                done["relaunched"].append(job.id)
        for job_id in self.store.finished_before(now - self.config.retention_seconds):
            self.purge(job_id, force=True)
            done["expired"].append(job_id)
        self.control.prune_workers()
        return done

    def _deadline_reason(self) -> str:
        return (f"the job passed its deadline ({self.config.job_deadline_seconds:g} s after submission) "
                f"before it finished")

    # ------------------------------------------------------------------ control
    def cancel(self, job_id: str, *, store: JobStore | None = None, control: QueueControl | None = None) -> Job:
        """Ask the job to stop: ``cancelled`` at once when nothing runs it, else ``cancelling``.

        ``store`` and ``control`` let the API pass its own (quick to give up) Redis client."""
        store, control = store or self.store, control or self.control
        job = store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state.finished:
            return job
        control.cancel(job_id)
        if job.state == JobState.queued or not self._alive(job_id) and not store.locked(job_id):
            # not running anywhere (yet): record it now; a runner that starts later sees the flag
            return store.update(job_id, state=JobState.cancelled, finished=time.time())
        return store.update(job_id, state=JobState.cancelling)

    def purge(self, job_id: str, *, force: bool = False, store: JobStore | None = None,
              control: QueueControl | None = None) -> int:
        """Delete a finished job's records, events, queue keys and files; returns the keys deleted.

        ``force`` also purges a job whose record is gone (retention) and never checks its state."""
        store, control = store or self.store, control or self.control
        job = store.get(job_id)
        if not force and job is not None and not job.state.finished:
            raise JobStillRunning(f"job {job_id} is {job.state.value}; cancel it first, then purge it")
        deleted = control.forget_job(job_id) + store.purge(job_id)
        job_dir = self.config.jobs_dir / job_id
        if job_dir.is_dir() and job_dir.parent == self.config.jobs_dir:
            shutil.rmtree(job_dir, ignore_errors=True)
        return deleted

    # ------------------------------------------------------------------ the runner
    def _run(self, job_id: str) -> None:
        with self._slots:
            if self._stopping.is_set():
                return
            try:
                if not self._acquire(job_id):
                    return
            except redis.RedisError as error:
                log.warning("job %s: Redis unreachable while taking its lock (%s); the supervisor retries",
                            job_id, error)
                return
            renewer = threading.Thread(target=self._renew, args=(job_id,), daemon=True)
            done = threading.Event()
            renewer.done = done  # type: ignore[attr-defined]
            renewer.start()
            try:
                self._execute(job_id)
            except redis.RedisError as error:
                # nothing can be recorded without Redis; the lock expires and the supervisor
                # launches the job again, which resumes from its checkpoint
                log.warning("job %s lost Redis (%s); it resumes from its checkpoint when Redis answers",
                            job_id, error)
            except Exception:  # never let a job thread die silently
                log.exception("job %s crashed", job_id)
            finally:
                done.set()
                try:
                    self.store.unlock(job_id, self.owner)
                except redis.RedisError:
                    pass  # the lock expires by itself within lock_ttl

    def _acquire(self, job_id: str) -> bool:
        """Wait for the job's lock (a crashed orchestrator's lock expires within lock_ttl)."""
        while not self._stopping.is_set():
            job = self.store.get(job_id)
            if job is None or job.state.finished:
                return False
            if self.store.try_lock(job_id, self.owner, self.config.lock_ttl):
                return True
            self._stopping.wait(0.5)
        return False

    def _renew(self, job_id: str) -> None:
        done: threading.Event = threading.current_thread().done  # type: ignore[attr-defined]
        while not done.wait(self.config.lock_ttl / 3):
            try:
                self.store.try_lock(job_id, self.owner, self.config.lock_ttl)
            except redis.RedisError as error:
                log.warning("could not renew the lock of job %s: %s", job_id, error)

    def _execute(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state.finished:
            return
        if self.control.is_cancelled(job_id):
            self.store.update(job_id, state=JobState.cancelled, finished=time.time())
            return
        if job.deadline is not None and time.time() > job.deadline:
            self._fail(job_id, self._deadline_reason())
            return
        resumed = job.resumed + (1 if job.started is not None else 0)
        job = self.store.update(job_id, state=JobState.running, started=job.started or time.time(), resumed=resumed)
        if resumed:
            self.store.event(job_id, "log", {"message": f"resumed from checkpoint (restart {resumed})"})
        spec = self.store.spec(job_id)
        cancel_checked = [0.0, False]
        deadline = job.deadline

        def cancelled() -> bool:
            now = time.monotonic()
            if now - cancel_checked[0] > 0.25:
                cancel_checked[0] = now
                cancel_checked[1] = self.control.is_cancelled(job_id)
            return bool(cancel_checked[1])

        def overdue() -> bool:
            return deadline is not None and time.time() > deadline

        def should_stop() -> bool:
            return self._stopping.is_set() or cancelled() or overdue()

        settings = self.config.queue
        if settings.no_worker_timeout is None:
            from dataclasses import replace

            settings = replace(settings, no_worker_timeout=self.config.no_worker_timeout)
        progress = ProgressSink(self.store, job_id, should_stop=should_stop)
        inner = RedisQueue(settings=settings, client=self.redis, should_stop=should_stop, namespace=job_id)
        fraction = float((spec.get("options") or {}).get("max_failed_fraction") or 0.0)
        queue = CountingQueue(inner, progress, fraction, self.instruments)
        job_dir = self.config.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            metrics, artifacts = _RUNNERS[job.kind](spec, job_dir, queue=queue, progress=progress)
            if queue.over_budget():
                raise JobFailure(f"{queue.counts['blocks_failed']} of {queue.counts['blocks_sent']} blocks failed, "
                                 f"more than max_failed_fraction {fraction:g}")
        except RoundAborted:
            self._stopped(job_id, cancelled(), overdue())
            return
        except redis.RedisError:
            raise
        except QsurgeonError as error:
            self._fail(job_id, public_message(str(error)), queue.counts)
            return
        except Exception as error:
            log.exception("job %s failed", job_id)
            self._fail(job_id, f"internal error ({type(error).__name__}); the server log has the details",
                       queue.counts)
            return
        if should_stop():  # the engine returned early because we asked it to
            self._stopped(job_id, cancelled(), overdue())
            return
        progress.flush()
        metrics = {**metrics, "blocks": dict(queue.counts)}
        runner.add_service_counts(job_dir, queue.counts)
        self.store.update(job_id, state=JobState.succeeded, finished=time.time(), metrics=metrics,
                          artifacts=artifacts, progress={"fraction": 1.0})

    def _fail(self, job_id: str, reason: str, counts: dict[str, int] | None = None) -> None:
        changes: dict[str, Any] = {"state": JobState.failed, "finished": time.time(), "error": reason}
        if counts:
            changes["metrics"] = {"blocks": dict(counts)}
        self.store.update(job_id, **changes)

    def _stopped(self, job_id: str, cancelled: bool, overdue: bool = False) -> None:
        if cancelled:
            self.store.update(job_id, state=JobState.cancelled, finished=time.time())
        elif overdue:
            self._fail(job_id, self._deadline_reason())
        else:  # orchestrator shutting down: stays running in Redis, resumed on the next start
            self.store.event(job_id, "log", {"message": "orchestrator stopping; the job resumes on restart"})


class ProgressSink:
    """The engine's progress callback: every event goes to the job's event stream (SSE);
    the job record's ``progress`` is updated from them at most every ``min_interval`` s."""

    def __init__(self, store: JobStore, job_id: str, min_interval: float = 0.25,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.job_id = job_id
        self.min_interval = min_interval
        self.should_stop = should_stop
        self._last = 0.0
        job = store.get(job_id)
        self._progress: dict[str, Any] = job.progress.model_dump() if job is not None else {}
        self._blocks = 0
        self._dirty = False

    @property
    def current(self) -> dict[str, Any]:
        return self._progress

    def record(self, counts: dict[str, int]) -> None:
        """Block counts after a round, written at once (they decide whether the job fails)."""
        self._progress.update(counts)
        self._dirty = True
        self.flush()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        # every engine event is a chance to stop: the first one comes right after model loading
        # and calibration, before any block is queued
        if self.should_stop is not None and self.should_stop():
            raise RoundAborted("the job was asked to stop")
        report = normalise_progress(args, kwargs)
        if not report:
            return
        kind = str(report.pop("event", None) or "progress")
        self.store.event(self.job_id, kind, report)
        update = self._progress
        if kind == "start":
            self._blocks = int(report.get("blocks") or 0)
            update["stage"] = "started"
        elif kind == "block":
            block = int(report.get("block", 0))
            update["stage"] = f"block {block + 1}/{self._blocks or report.get('blocks')}"
            update["fraction"] = block / max(1, self._blocks)
        elif kind == "round":
            update["round"] = int(update.get("round") or 0) + 1
            update["epoch"] = report.get("epoch")
            update["energy"] = report.get("energy")
            update["blocks_solved"] = int(update.get("blocks_solved") or 0) + int(report.get("blocks") or 0)
            update["blocks_accepted"] = int(update.get("blocks_accepted") or 0) + int(report.get("accepted") or 0)
        elif kind == "block_done":
            update["fraction"] = (int(report.get("block", 0)) + 1) / max(1, self._blocks)
        else:
            update.update({k: v for k, v in report.items() if isinstance(v, (int, float, str)) and k in update})
        self._dirty = True
        if time.monotonic() - self._last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            self.store.update(self.job_id, progress=dict(self._progress))
            self._dirty = False
        self._last = time.monotonic()


def normalise_progress(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept a dict, a dataclass or keyword arguments from the engine."""
    import dataclasses

    report: dict[str, Any] = {}
    for arg in args:
        if isinstance(arg, dict):
            report.update(arg)
        elif dataclasses.is_dataclass(arg) and not isinstance(arg, type):
            report.update(dataclasses.asdict(arg))
        elif isinstance(arg, str):
            report["message"] = arg
    report.update(kwargs)
    return runner.jsonable(report)
