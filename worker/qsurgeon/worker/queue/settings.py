"""How the Redis queue is reached and the limits both of its ends share.

The orchestrator and every worker must be built from equal :class:`QueueSettings` (the
same prefix above all), so the settings live apart from either end.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

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

    def __post_init__(self) -> None:
        if not self.prefix or any(ch in self.prefix for ch in " \n\r\t{}"):
            raise UsageError(f"invalid Redis key prefix {self.prefix!r}")
        if self.visibility_timeout <= 0 or self.max_attempts < 1 or self.max_message_bytes < 1024:
            raise UsageError("visibility_timeout must be > 0, max_attempts ≥ 1, max_message_bytes ≥ 1024")


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client for ``url`` (bytes responses); raises UsageError for a malformed URL."""
    try:
        return redis.Redis.from_url(url or DEFAULT_REDIS_URL, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as error:
        raise UsageError(f"invalid Redis URL {url!r}: {error}") from None
