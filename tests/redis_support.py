"""Redis for tests: the real server at $REDIS_URL, and a key prefix per test that is removed after it.

Without Redis the tests skip when run by hand, but fail under CI (``CI`` set): .ci/run starts
a server, so a missing one there is a broken set-up, not a reason to pass quietly.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
import redis

from qsurgeon.worker.queue.settings import connect

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client() -> redis.Redis:
    """A connection to the test Redis, or skip (fail under CI) when none answers."""
    connection = connect(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError:
        message = f"no Redis at {REDIS_URL}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide one (.ci/run starts it)")
        pytest.skip(message)
    return connection


@contextmanager
def key_prefix(client: redis.Redis, label: str) -> Iterator[str]:
    """A fresh key prefix for one test (so tests never collide); its keys are deleted afterwards."""
    name = f"{label}-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)


@contextmanager
def running_worker(worker, *, registered: bool = False, join_timeout: float = 20.0):
    """``worker.run`` on a daemon thread for the ``with`` block; stopped and joined after it.

    ``registered``: wait until the worker has announced itself in Redis (its heartbeat entry),
    for tests whose first step needs a live worker (readiness, job runs). Leaving the block
    asserts the thread ended, so a worker that ignores stop() fails the test that started it.
    """
    import threading
    import time

    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        if registered:
            connection = connect(REDIS_URL)
            deadline = time.monotonic() + 5
            while not connection.zscore(f"{worker.settings.prefix}:workers", worker.name):
                assert time.monotonic() < deadline, "the worker did not register"
                time.sleep(0.05)
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=join_timeout)
        assert not thread.is_alive(), "the worker thread did not stop"
