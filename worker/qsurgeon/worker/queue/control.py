"""Reads and commands about the queue as a whole, for the service: cancel a job, list the
live workers, read the counters and the dead letters, count pending messages.

Apart from :class:`~qsurgeon.worker.queue.producer.RedisQueue` because the service needs
these without running a round (a cancel request, ``/readyz``, ``/metrics``).
"""

from __future__ import annotations

import time

import redis

from qsurgeon.worker.queue.keys import GROUP, Keys
from qsurgeon.worker.queue.settings import QueueSettings


class QueueControl:
    """Control of one queue (one prefix) through an existing Redis client."""

    def __init__(self, client: redis.Redis, settings: QueueSettings | None = None) -> None:
        self.redis = client
        self.settings = settings or QueueSettings()
        self.keys = Keys(self.settings.prefix)

    def cancel(self, job_id: str) -> None:
        """Workers drop the job's queued blocks as they reach them."""
        self.redis.sadd(self.keys.cancelled, job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.sismember(self.keys.cancelled, job_id))

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

    def pending_count(self, solver: str) -> int:
        """Messages of ``solver`` delivered to a worker and not yet acknowledged."""
        try:
            return int(self.redis.xpending(self.keys.stream(solver), GROUP)["pending"])
        except redis.ResponseError:
            return 0
