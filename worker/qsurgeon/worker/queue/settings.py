"""How the Redis queue is reached and the limits both of its ends share.

The orchestrator and every worker must be built from equal :class:`QueueSettings` (the
same prefix above all), so the settings live apart from either end.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from qsurgeon.client.errors import UsageError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "qsurgeon"


@dataclass(frozen=True)
class QueueSettings:
    """Limits and timings shared by the orchestrator and the workers."""

    prefix: str = DEFAULT_PREFIX
    visibility_timeout: float = 60.0  # seconds a message may stay unacknowledged before reclaim
    max_attempts: int = 3  # deliveries before a message is dead-lettered
    max_message_bytes: int = 64 << 20  # a larger problem fails without being enqueued
    share_threshold: int = 64 << 10  # arrays this large are shared when several problems hold them
    round_timeout: float | None = None  # seconds; blocks still missing then come back as None
    no_worker_timeout: float | None = None  # seconds a round waits with no live worker for its solver

    def __post_init__(self) -> None:
        if not self.prefix or any(ch in self.prefix for ch in " \n\r\t{}"):
            raise UsageError(f"invalid Redis key prefix {self.prefix!r}")
        if self.visibility_timeout <= 0 or self.max_attempts < 1 or self.max_message_bytes < 1024:
            raise UsageError("visibility_timeout must be > 0, max_attempts ≥ 1, max_message_bytes ≥ 1024")


#: How long one Redis call keeps retrying through an outage, by role: a job thread or a worker
#: rides out a restart of Redis; the API gives up sooner and answers 503, since its client
#: will retry anyway and a request should not hang.
RETRY_SECONDS_BACKGROUND = 30.0
RETRY_SECONDS_API = 1.0


def retry_policy(seconds: float) -> Retry:
    """Exponential backoff (50 ms doubling, capped at 1 s) for about ``seconds`` in all.

    Only connection errors and timeouts are retried (a restarting or unreachable Redis);
    an error answer (a wrong command, NOGROUP) is the caller's to handle.
    """
    waits, total = 0, 0.0
    while total < seconds:
        total += min(1.0, 0.05 * 2 ** waits)
        waits += 1
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), waits)


def connect(url: str | None = None, *, retry_seconds: float = RETRY_SECONDS_BACKGROUND) -> redis.Redis:
    """A Redis client for ``url`` (bytes responses); raises UsageError for a malformed URL.

    Every call retries connection failures with bounded backoff (:func:`retry_policy`), so
    a Redis restart is a pause, not an error, for anything shorter than ``retry_seconds``.
    A socket timeout bounds a call to a Redis that accepts but never answers.
    """
    try:
        return redis.Redis.from_url(url or DEFAULT_REDIS_URL, socket_connect_timeout=2, socket_timeout=15,
                                    health_check_interval=30, retry=retry_policy(retry_seconds),
                                    retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    except ValueError as error:
        raise UsageError(f"invalid Redis URL {url!r}: {error}") from None
