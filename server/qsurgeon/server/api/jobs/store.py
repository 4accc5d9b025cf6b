"""Job records and job events, kept in Redis so they outlive the orchestrator process.

``{p}:job:{id}``     hash: ``doc`` (the public :class:`Job` as JSON) and ``spec`` (what the
                     job runs: resolved model path, calibration, options; never sent out)
``{p}:jobs``         sorted set id -> creation time (listing order)
``{p}:events:{id}``  stream of events (state, round, progress); SSE clients read it with
                     XREAD and resume from their Last-Event-ID
``{p}:lock:{id}``    which orchestrator runs the job now (a short TTL, renewed)
``{p}:idem:{owner}:{h}``  an Idempotency-Key's job (``job id`` then the request's digest);
                     it expires with the retention time

Who deletes them: :meth:`JobStore.purge` (``DELETE /v1/jobs/{id}?purge=true``,
``qsurgeon purge``, and the orchestrator's retention sweep for jobs finished longer ago
than the retention time). A finished job's record and events also carry that TTL, so a
job outlives a vanished orchestrator by the retention time at most.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from typing import Any

import redis

from qsurgeon.client.schemas import Job, JobKind, JobState

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_EVENTS_PER_JOB = 20000


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str, retention: float | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        self.retention = retention  # seconds a finished job's records are kept (None: until purged)
        self._lock = threading.Lock()

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}:jobs"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def lock_key(self, job_id: str) -> str:
        return f"{self.prefix}:lock:{job_id}"

    # ------------------------------------------------------------------ records
    def idempotency_key(self, owner: str, digest: str) -> str:
        return f"{self.prefix}:idem:{owner}:{digest}"

    # ------------------------------------------------------------------ records
    def create(self, kind: JobKind, spec: dict[str, Any], *, model: str | None, options: dict[str, Any],
               job_id: str | None = None, owner: str = "", deadline: float | None = None) -> Job:
        created = time.time()
        job = Job(id=job_id or uuid.uuid4().hex, kind=kind, state=JobState.queued, created=created,
                  model=model, options=options, deadline=deadline)
        pipe = self.redis.pipeline()
        pipe.hset(self._key(job.id), mapping={"doc": job.model_dump_json(), "spec": json.dumps(spec),
                                              "owner": owner})
        pipe.zadd(self.index, {job.id: job.created})
        pipe.execute()
        self.event(job.id, "state", {"state": job.state.value})
        return job

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        raw = self.redis.hget(self._key(job_id), "doc")
        return None if raw is None else Job.model_validate_json(raw)

    def owner(self, job_id: str) -> str:
        raw = self.redis.hget(self._key(job_id), "owner")
        return "" if raw is None else raw.decode()

    def spec(self, job_id: str) -> dict[str, Any]:
        raw = self.redis.hget(self._key(job_id), "spec")
        return {} if raw is None else json.loads(raw)

    def update(self, job_id: str, **changes: Any) -> Job:
        """Read-modify-write of one job's public record (one writer per job: its runner)."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                raise KeyError(job_id)
            data = job.model_dump()
            for name, value in changes.items():
                if name == "progress" and isinstance(value, dict):
                    data["progress"] = {**data["progress"], **value}
                else:
                    data[name] = value
            updated = Job.model_validate(data)
            self.redis.hset(self._key(job_id), "doc", updated.model_dump_json())
        if updated.state.finished and self.retention is not None:  # finished records expire on their own
            pipe = self.redis.pipeline(transaction=False)
            pipe.expire(self._key(job_id), int(self.retention))
            pipe.expire(self.events_key(job_id), int(self.retention))
            pipe.execute()
        if "state" in changes:
            self.event(job_id, "state", {"state": updated.state.value, "error": updated.error})
        return updated

    def list(self, limit: int = 100, state: JobState | None = None, owner: str | None = None) -> list[Job]:
        """Newest first; ``owner`` (None: every owner's) keeps only that owner's jobs."""
        ids = [raw.decode() for raw in self.redis.zrevrange(self.index, 0, -1)]
        jobs = []
        for job_id in ids:
            job = self.get(job_id)
            if job is None:  # expired: its index entry goes too
                self.redis.zrem(self.index, job_id)
                continue
            if owner is not None and self.owner(job_id) != owner:
                continue
            if state is None or job.state == state:
                jobs.append(job)
                if len(jobs) >= limit:
                    break
        return jobs

    def unfinished(self) -> list[Job]:
        ids = [raw.decode() for raw in self.redis.zrange(self.index, 0, -1)]
        return [job for job in (self.get(i) for i in ids) if job is not None and not job.state.finished]

    def count_by_state(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        for job_id in self.redis.zrange(self.index, 0, -1):
            job = self.get(job_id.decode())
            if job is not None:
                counts[job.state.value] += 1
        return counts

    def purge(self, job_id: str) -> int:
        """Delete the job's record, events, index entry, lock and idempotency key; returns keys deleted."""
        owner = self.owner(job_id)
        keys = [self._key(job_id), self.events_key(job_id), self.lock_key(job_id)]
        if owner:
            for key in self.redis.scan_iter(match=f"{self.prefix}:idem:{owner}:*", count=1000):
                if (self.redis.get(key) or b"").split(b"|", 1)[0] == job_id.encode():
                    keys.append(key.decode())
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(*keys)
        pipe.zrem(self.index, job_id)
        return int(pipe.execute()[0])

    def finished_before(self, cutoff: float) -> list[str]:
        """Ids of jobs that finished before ``cutoff`` (unix s) or whose record has expired."""
        found = []
        for raw in self.redis.zrange(self.index, 0, -1):
            job_id = raw.decode()
            job = self.get(job_id)
            if job is None or (job.state.finished and (job.finished or job.created) < cutoff):
                found.append(job_id)
        return found

    def locked(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.lock_key(job_id)))

    # ------------------------------------------------------------------ events
    def event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        entry_id = self.redis.xadd(self.events_key(job_id), {"type": kind, "data": json.dumps(data, default=str)},
                                   maxlen=MAX_EVENTS_PER_JOB, approximate=True)
        return entry_id.decode()

    def read_events(self, job_id: str, after: str = "0-0", block_ms: int = 1000) -> list[tuple[str, str, dict]]:
        reply = self.redis.xread({self.events_key(job_id): after}, count=500, block=block_ms)
        events = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                events.append((entry_id.decode(), fields[b"type"].decode(), json.loads(fields[b"data"])))
        return events

    # ------------------------------------------------------------------ ownership
    def try_lock(self, job_id: str, owner: str, ttl: float) -> bool:
        key = self.lock_key(job_id)
        if self.redis.set(key, owner, nx=True, px=int(ttl * 1000)):
            return True
        if self.redis.get(key) == owner.encode():
            self.redis.pexpire(key, int(ttl * 1000))
            return True
        return False

    def unlock(self, job_id: str, owner: str) -> None:
        key = self.lock_key(job_id)
        if self.redis.get(key) == owner.encode():
            self.redis.delete(key)
