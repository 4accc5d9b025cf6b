"""Reads and commands about the queue as a whole, for the service: cancel a job, list the
live workers, read the counters and the dead letters, count pending messages.

Apart from :class:`~qsurgeon.worker.queue.producer.RedisQueue` because the service needs
these without running a round (a cancel request, ``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import time

import redis

import json

from qsurgeon.worker.queue.keys import DEAD_WORKER_SECONDS, GROUP, ROUND_TTL_SECONDS, Keys, job_keys
from qsurgeon.worker.queue.settings import QueueSettings


class QueueControl:
    """Control of one queue (one prefix) through an existing Redis client."""

    def __init__(self, client: redis.Redis, settings: QueueSettings | None = None) -> None:
        self.redis = client
        self.settings = settings or QueueSettings()
        self.keys = Keys(self.settings.prefix)

    def cancel(self, job_id: str) -> None:
        """Workers drop the job's queued blocks as they reach them (the flag expires after a day)."""
        self.redis.set(self.keys.cancelled(job_id), 1, ex=ROUND_TTL_SECONDS)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.cancelled(job_id)))

    def forget_job(self, job_id: str) -> int:
        """Delete every queue key of a job (a purge); returns how many existed."""
        found = job_keys(self.redis, self.keys, job_id)
        return int(self.redis.delete(*found)) if found else 0

    def prune_workers(self) -> int:
        """Forget workers silent for :data:`DEAD_WORKER_SECONDS` (their own key has expired)."""
        return int(self.redis.zremrangebyscore(self.keys.workers, "-inf", time.time() - DEAD_WORKER_SECONDS))

    def workers_by_solver(self, within: float = 30.0) -> dict[str, int]:
        """Live workers per solver they serve (a worker serving three solvers counts for each)."""
        names = self.live_workers(within)
        if not names:
            return {}
        counts: dict[str, int] = {}
        for raw in self.redis.mget([self.keys.worker(name) for name in names]):
            if raw is None:
                continue
            try:
                backends = json.loads(raw).get("backends", [])
            except (ValueError, AttributeError):
                continue
            for backend in backends:
                counts[str(backend)] = counts.get(str(backend), 0) + 1
        return counts

    def streams(self) -> list[str]:
        """Solver names that have a block stream."""
        head = f"{self.keys.prefix}:blocks:"
        return sorted(key.decode()[len(head):] for key in self.redis.scan_iter(match=f"{head}*", count=1000))

    def queue_depth(self, solver: str) -> dict[str, int]:
        """Messages of ``solver``'s stream: ``length`` (in the stream), ``pending`` (delivered,
        unacknowledged) and ``lag`` (never delivered to any worker)."""
        stream = self.keys.stream(solver)
        depth = {"length": int(self.redis.xlen(stream)), "pending": 0, "lag": 0}
        try:
            for group in self.redis.xinfo_groups(stream):
                if group.get("name") in (GROUP, GROUP.encode()):
                    depth["pending"] = int(group.get("pending") or 0)
                    lag = group.get("lag")
                    depth["lag"] = int(lag) if lag is not None else max(0, depth["length"] - depth["pending"])
        except redis.ResponseError:
            pass
        return depth

    def live_workers(self, within: float = 30.0) -> list[str]:
        """Names of workers whose last heartbeat is at most ``within`` seconds old."""
        names = self.redis.zrangebyscore(self.keys.workers, time.time() - within, "+inf")
        return [name.decode() for name in names]

    def stats(self) -> dict[str, float]:
        return {field.decode(): float(value) for field, value in self.redis.hgetall(self.keys.stats).items()}

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries = self.redis.xrange(self.keys.dead, count=count)
        return [{k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"body"}
                for _, fields in entries]

    def dead_letter_count(self) -> int:
        return int(self.redis.xlen(self.keys.dead))

    def pending_count(self, solver: str) -> int:
        """Messages of ``solver`` delivered to a worker and not yet acknowledged."""
        try:
            return int(self.redis.xpending(self.keys.stream(solver), GROUP)["pending"])
        except redis.ResponseError:
            return 0
