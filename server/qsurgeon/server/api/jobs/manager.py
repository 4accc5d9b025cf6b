"""Runs jobs in background threads and resumes unfinished ones after a restart.

One thread per running job (at most ``max_running_jobs`` at once; the rest wait in
state ``queued``). A thread first takes the job's Redis lock (a short TTL it keeps
renewing), so two orchestrators never run the same job; after a crash the lock simply
expires and the restarted orchestrator takes over, resuming from the job's checkpoint.

Stopping: ``shutdown()`` makes every round abort (RoundAborted: nothing of that round
is applied) and leaves the jobs ``running`` in Redis, so the next start-up resumes them.
Cancelling marks the job in Redis: workers drop its blocks, the thread stops at the
next poll and records ``cancelled``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

import redis

from qsurgeon.client.errors import QsurgeonError
from qsurgeon.client.schemas import Job, JobKind, JobState
from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.jobs import runner
from qsurgeon.server.api.jobs.store import JobStore
from qsurgeon.worker.queue.control import QueueControl
from qsurgeon.worker.queue.producer import RedisQueue, RoundAborted

log = logging.getLogger(__name__)

_RUNNERS: dict[JobKind, Callable[..., tuple[dict[str, Any], list[str]]]] = {
    JobKind.prune: runner.run_prune_job,
    JobKind.solve: runner.run_solve_job,
}


class JobManager:
    def __init__(self, config: ServiceConfig, client: redis.Redis, store: JobStore) -> None:
        self.config = config
        self.redis = client
        self.store = store
        self.owner = uuid.uuid4().hex
        self._stopping = threading.Event()
        self._slots = threading.Semaphore(config.max_running_jobs)
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.control = QueueControl(client, config.queue)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> list[str]:
        """Resume every unfinished job; returns their ids."""
        resumed = []
        for job in self.store.unfinished():
            self.launch(job.id)
            resumed.append(job.id)
        if resumed:
            log.info("resuming %d unfinished job(s)", len(resumed))
        return resumed

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))

    def launch(self, job_id: str) -> None:
        with self._lock:
            thread = self._threads.get(job_id)
            if thread is not None and thread.is_alive():
                return
            thread = threading.Thread(target=self._run, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True)
            self._threads[job_id] = thread
        thread.start()

    def running(self) -> int:
        return sum(thread.is_alive() for thread in self._threads.values())

    # ------------------------------------------------------------------ control
    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state.finished:
            return job
        self.control.cancel(job_id)
        thread = self._threads.get(job_id)
        if thread is None or not thread.is_alive() or job.state == JobState.queued:
            # not running here (yet): record it now; a runner that starts later sees the flag
            return self.store.update(job_id, state=JobState.cancelled, finished=time.time())
        return job

    # ------------------------------------------------------------------ the runner
    def _run(self, job_id: str) -> None:
        with self._slots:
            if self._stopping.is_set():
                return
            if not self._acquire(job_id):
                return
            renewer = threading.Thread(target=self._renew, args=(job_id,), daemon=True)
            done = threading.Event()
            renewer.done = done  # type: ignore[attr-defined]
            renewer.start()
            try:
                self._execute(job_id)
            except Exception:  # never let a job thread die silently
                log.exception("job %s crashed", job_id)
            finally:
                done.set()
                self.store.unlock(job_id, self.owner)

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
        resumed = job.resumed + (1 if job.started is not None else 0)
        job = self.store.update(job_id, state=JobState.running, started=job.started or time.time(), resumed=resumed)
        if resumed:
            self.store.event(job_id, "log", {"message": f"resumed from checkpoint (restart {resumed})"})
        spec = self.store.spec(job_id)
        cancel_checked = [0.0, False]

        def cancelled() -> bool:
            now = time.monotonic()
            if now - cancel_checked[0] > 0.25:
                cancel_checked[0] = now
                cancel_checked[1] = self.control.is_cancelled(job_id)
            return bool(cancel_checked[1])

        def should_stop() -> bool:
            return self._stopping.is_set() or cancelled()

        queue = RedisQueue(settings=self.config.queue, client=self.redis, should_stop=should_stop, namespace=job_id)
        progress = ProgressSink(self.store, job_id)
        job_dir = self.config.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        try:
            metrics, artifacts = _RUNNERS[job.kind](spec, job_dir, queue=queue, progress=progress)
        except RoundAborted:
            self._stopped(job_id, cancelled())
            return
        except QsurgeonError as error:
            self.store.update(job_id, state=JobState.failed, finished=time.time(), error=str(error))
            return
        except Exception as error:
            log.exception("job %s failed", job_id)
            self.store.update(job_id, state=JobState.failed, finished=time.time(),
                              error=f"{type(error).__name__}: {error}")
            return
        if should_stop():  # the engine returned early because we asked it to
            self._stopped(job_id, cancelled())
            return
        progress.flush()
        self.store.update(job_id, state=JobState.succeeded, finished=time.time(), metrics=metrics,
                          artifacts=artifacts, progress={"fraction": 1.0})

    def _stopped(self, job_id: str, cancelled: bool) -> None:
        if cancelled:
            self.store.update(job_id, state=JobState.cancelled, finished=time.time())
        else:  # orchestrator shutting down: stays running in Redis, resumed on the next start
            self.store.event(job_id, "log", {"message": "orchestrator stopping; the job resumes on restart"})


class ProgressSink:
    """The engine's progress callback: every event goes to the job's event stream (SSE);
    the job record's ``progress`` is updated from them at most every ``min_interval`` s."""

    def __init__(self, store: JobStore, job_id: str, min_interval: float = 0.25) -> None:
        self.store = store
        self.job_id = job_id
        self.min_interval = min_interval
        self._last = 0.0
        job = store.get(job_id)
        self._progress: dict[str, Any] = job.progress.model_dump() if job is not None else {}
        self._blocks = 0
        self._dirty = False

    def __call__(self, *args: Any, **kwargs: Any) -> None:
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
