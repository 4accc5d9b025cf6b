"""The worker loop: read block problems from Redis, solve them in batches, publish answers.

At-least-once delivery: a message is acknowledged only together with its result (one
Lua script), so a worker that dies mid-batch leaves its messages pending; another
worker takes them over with XAUTOCLAIM once they have been idle longer than the
visibility timeout. Every delivery bumps an attempt counter; past ``max_attempts`` the
message is moved to the dead-letter stream and its block fails (the engine then keeps
the block's current assignment). Duplicated answers are harmless: results are written
with HSETNX keyed by block id inside the round.

A backend that waits on a remote service (a cloud QPU, say) keeps its messages by
calling ``current_lease().renew()`` while it waits, and records its remote task id with
``current_lease().record(...)``, so a retry after a crash can resume the remote task
instead of submitting it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import redis

from qsurgeon.client.errors import QsurgeonError
from qsurgeon.worker.block.codec import decode_problem, encode_result
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.queue.keys import (
    DEAD_LETTERS_KEPT, DEAD_WORKER_SECONDS, GROUP, ROUND_TTL_SECONDS, Keys, ensure_group,
)
from qsurgeon.worker.queue.settings import QueueSettings
from qsurgeon.worker.solve import solve_each_on_failure
from qsurgeon.worker.solvers.registry import solver_names

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0

# Publish one result and acknowledge its message atomically. The answer is written only while
# its round is open (the round's hash exists): a late answer to a collected round, or to a
# round Redis lost, must not re-create its result keys. HSETNX makes duplicates no-ops, and
# only a first answer is counted (ARGV[6] names the counter) and pushes the wake-up. XDEL
# keeps the stream from growing.
PUBLISH_SCRIPT = """
local fresh = 0
if redis.call('EXISTS', KEYS[5]) == 1 then
  fresh = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
  if fresh == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[1])
    redis.call('EXPIRE', KEYS[1], ARGV[5])
    redis.call('EXPIRE', KEYS[2], ARGV[5])
    redis.call('HINCRBY', KEYS[6], ARGV[6], 1)
  end
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3])
end
return fresh
"""

class Lease:
    """The messages a worker thread is solving right now, and the means to keep them.

    ``renew()`` resets their idle time (XCLAIM ... JUSTID), so no other worker reclaims
    them while a slow backend is still working. ``record(key, value)`` stores state (a
    remote task id) that outlives this worker; ``recorded`` holds what an earlier
    attempt stored, so a retry can pick up where it left off. ``spend(field, amount)``
    adds to the budget ledger of the messages' jobs, which every worker of a job shares,
    so a per-job budget of remote blocks holds across workers and rounds.
    """

    def __init__(self, client: redis.Redis, keys: Keys, stream: str, consumer: str, message_ids: list[str],
                 jobs: list[str] | None = None) -> None:
        self._client = client
        self._keys = keys
        self._stream = stream
        self._consumer = consumer
        self.message_ids = message_ids
        self.jobs = sorted(set(jobs or []))
        self.renewals = 0

    def renew(self) -> int:
        """Reset the idle time of every held message; returns how many are still ours."""
        if not self.message_ids:
            return 0
        claimed = self._client.xclaim(self._stream, GROUP, self._consumer, 0, self.message_ids, justid=True)
        self.renewals += 1
        return len(claimed)

    def record(self, key: str, value: str) -> None:
        """Store ``key = value`` for every held message (kept for a day)."""
        pipe = self._client.pipeline(transaction=False)
        for message_id in self.message_ids:
            pipe.hset(self._keys.remote(message_id), key, value)
            pipe.expire(self._keys.remote(message_id), ROUND_TTL_SECONDS)
        pipe.execute()

    def spend(self, field: str, amount: float = 0.0) -> float:
        """Add ``amount`` to ``field`` of each job's budget ledger; the largest total after.

        ``amount=0`` reads. A batch that mixes jobs charges each of them the whole amount
        (a budget may be under-used that way, never overrun).
        """
        if not self.jobs:
            return 0.0
        pipe = self._client.pipeline(transaction=False)
        for job in self.jobs:
            pipe.hincrbyfloat(self._keys.budget(job), field, amount)
            pipe.expire(self._keys.budget(job), ROUND_TTL_SECONDS)
        return max(float(total) for total in pipe.execute()[::2])

    @property
    def recorded(self) -> dict[str, str]:
        """What earlier attempts recorded for the held messages (merged)."""
        merged: dict[str, str] = {}
        for message_id in self.message_ids:
            values = self._client.hgetall(self._keys.remote(message_id))
            merged.update({k.decode(): v.decode() for k, v in values.items()})
        return merged


_local = threading.local()


def current_lease() -> Lease | None:
    """The lease of the batch this thread is solving, or None outside a worker."""
    return getattr(_local, "lease", None)


@dataclass
class _Message:
    message_id: str
    stream: str
    job: str
    round_id: str
    block: str
    body: bytes
    attempt: int = 1


@dataclass
class WorkerStats:
    solved: int = 0
    failed: int = 0
    dead: int = 0
    dropped: int = 0
    solve_seconds: float = 0.0
    batches: list[int] = field(default_factory=list)


class Worker:
    """Consume block problems for ``backends`` until ``stop()`` (or SIGTERM via the CLI)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        settings: QueueSettings | None = None,
        backends: list[str] | None = None,
        concurrency: int = 1,
        batch_size: int = 32,
        name: str | None = None,
        block_ms: int = 500,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        self.redis = client
        self.settings = settings or QueueSettings()
        self.keys = Keys(self.settings.prefix)
        self.backends = list(backends or solver_names())
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._publish = client.register_script(PUBLISH_SCRIPT)
        self._round_cache: dict[tuple[str, str], tuple[str, dict[str, Any]] | None] = {}
        self._lock = threading.Lock()

    @property
    def streams(self) -> dict[str, str]:
        return {self.keys.stream(backend): backend for backend in self.backends}

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ main loops
    def run(self) -> WorkerStats:
        """Run ``concurrency`` consumer threads and a heartbeat until stopped."""
        self._ensure_groups()
        threads = [threading.Thread(target=self._consume, name=f"{self.name}-{i}", args=(f"{self.name}-{i}",),
                                    daemon=True) for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        try:
            self._heartbeat()
            while not self._stop.wait(HEARTBEAT_SECONDS / 5):
                self._heartbeat()
                if not any(thread.is_alive() for thread in threads):
                    break
        finally:
            self._stop.set()
            for thread in threads:
                thread.join()
            try:
                self.redis.zrem(self.keys.workers, self.name)
                self.redis.delete(self.keys.worker(self.name))
            except redis.RedisError as error:  # the entry is pruned by others once it is stale
                log.warning("could not remove this worker's heartbeat (%s)", error)
        return self.stats

    def _ensure_groups(self) -> None:
        """Create every served stream's consumer group (again, after Redis lost its data)."""
        for stream in self.streams:
            ensure_group(self.redis, stream)

    def _heartbeat(self) -> None:
        """Beat at most every HEARTBEAT_SECONDS; an outage only delays it (never raises), and
        workers silent for DEAD_WORKER_SECONDS are pruned from the set on the way."""
        now = time.time()
        if now - getattr(self, "_last_beat", 0.0) < HEARTBEAT_SECONDS:
            return
        info = {"name": self.name, "pid": os.getpid(), "backends": self.backends, "solved": self.stats.solved,
                "failed": self.stats.failed, "concurrency": self.concurrency}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.keys.workers, {self.name: now})
            pipe.set(self.keys.worker(self.name), json.dumps(info), ex=int(HEARTBEAT_SECONDS * 6))
            pipe.zremrangebyscore(self.keys.workers, "-inf", now - DEAD_WORKER_SECONDS)
            pipe.execute()
            self._last_beat = now
        except redis.RedisError as error:
            log.warning("heartbeat failed (%s); retrying", error)

    def _consume(self, consumer: str) -> None:
        """The consumer loop. Nothing but ``stop()`` ends it: Redis being away is retried with a
        bounded backoff (a batch in hand stays pending and is reclaimed, never lost), a lost
        consumer group (NOGROUP: Redis restarted without its data) is re-created, and any
        other error is logged and the loop goes on."""
        last_reclaim = 0.0
        failures = 0
        while not self._stop.is_set():
            try:
                messages: list[_Message] = []
                if time.monotonic() - last_reclaim > min(self.settings.visibility_timeout / 2, 5.0):
                    last_reclaim = time.monotonic()
                    messages = self._reclaim(consumer)
                if not messages:
                    messages = self._read(consumer)
                if messages:
                    self.process(messages, consumer)
                failures = 0
            except redis.ResponseError as error:
                if "NOGROUP" in str(error):
                    log.warning("consumer group missing (Redis lost its data?); re-creating it")
                    try:
                        self._ensure_groups()
                    except redis.RedisError:
                        pass
                else:
                    log.exception("Redis refused a command; going on")
                    self._stop.wait(1.0)
            except redis.RedisError as error:
                failures += 1
                log.warning("Redis unreachable (%s); retrying", error)
                self._stop.wait(min(5.0, 0.1 * 2 ** min(failures, 6)))
            except Exception:  # a bug must not end the worker; the batch is reclaimed and retried
                log.exception("unexpected error in the consumer loop; going on")
                self._stop.wait(1.0)

    def _read(self, consumer: str) -> list[_Message]:
        reply = self.redis.xreadgroup(GROUP, consumer, {stream: ">" for stream in self.streams},
                                      count=self.batch_size, block=self.block_ms)
        return [message for stream, entries in reply or [] for message in self._parse(stream, entries)]

    def _reclaim(self, consumer: str) -> list[_Message]:
        """Take over messages of crashed or stalled workers (idle past the visibility timeout)."""
        idle_ms = int(self.settings.visibility_timeout * 1000)
        messages: list[_Message] = []
        for stream in self.streams:
            reply = self.redis.xautoclaim(stream, GROUP, consumer, idle_ms, count=self.batch_size)
            entries = reply[1] if len(reply) > 1 else []
            if entries:
                log.info("reclaimed %d message(s) from %s", len(entries), stream)
                self.redis.hincrby(self.keys.stats, "messages_reclaimed", len(entries))
            messages.extend(self._parse(stream, entries))
            if messages:
                break
        return messages

    @staticmethod
    def _parse(stream: Any, entries: list) -> Iterator[_Message]:
        stream_name = stream.decode() if isinstance(stream, bytes) else stream
        for message_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            yield _Message(
                message_id=message_id.decode(), stream=stream_name, job=fields[b"job"].decode(),
                round_id=fields[b"round"].decode(), block=fields[b"block"].decode(), body=fields[b"body"],
            )

    # ------------------------------------------------------------------ one batch
    def _round_info(self, job: str, round_id: str) -> tuple[str, dict[str, Any]] | None:
        cache_key = (job, round_id)
        with self._lock:
            if cache_key in self._round_cache:
                return self._round_cache[cache_key]
        values = self.redis.hgetall(self.keys.round(job, round_id))
        if not values:  # not cached: a round Redis lost comes back when the orchestrator re-sends it
            return None
        info = (values[b"solver"].decode(), json.loads(values[b"params"]))
        with self._lock:
            if len(self._round_cache) > 1024:
                self._round_cache.clear()
            self._round_cache[cache_key] = info
        return info

    def _finish(self, message: _Message, result: bytes, pipe: Any = None, counter: str = "blocks_solved") -> None:
        """Publish and acknowledge atomically; with ``pipe``, queued for one round trip per batch.
        ``counter`` (a field of the stats hash) is bumped only by the first answer to a block."""
        keys = self.keys
        self._publish(
            keys=[keys.results(message.job, message.round_id), keys.note(message.job, message.round_id),
                  message.stream, keys.attempts, keys.round(message.job, message.round_id), keys.stats],
            args=[message.block, result, message.message_id, GROUP, ROUND_TTL_SECONDS, counter],
            client=pipe,
        )

    def _drop(self, message: _Message) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(message.stream, GROUP, message.message_id)
        pipe.xdel(message.stream, message.message_id)
        pipe.hdel(self.keys.attempts, message.message_id)
        pipe.execute()

    def _fail(self, message: _Message, reason: str, *, dead: bool = False) -> None:
        if dead:
            self.redis.xadd(self.keys.dead, {"job": message.job, "round": message.round_id, "block": message.block,
                                             "message": message.message_id, "reason": reason, "worker": self.name},
                            maxlen=DEAD_LETTERS_KEPT, approximate=True)
            self.stats.dead += 1
        self.stats.failed += 1
        self._finish(message, encode_result(None, reason), counter="blocks_dead" if dead else "blocks_failed")

    def count_attempts(self, messages: list[_Message]) -> list[int]:
        """Record one more delivery of each message; returns the new counts."""
        pipe = self.redis.pipeline(transaction=False)
        for message in messages:
            pipe.hincrby(self.keys.attempts, message.message_id, 1)
        return [int(n) for n in pipe.execute()]

    def process(self, messages: list[_Message], consumer: str) -> None:
        """Solve a batch: drop cancelled jobs' blocks, dead-letter over-tried ones, group the rest."""
        attempts = self.count_attempts(messages)
        cancelled = {job for job in {m.job for m in messages} if self.redis.exists(self.keys.cancelled(job))}
        groups: dict[tuple[str, str, str], list[tuple[_Message, BlockProblem]]] = {}
        for message, attempt in zip(messages, attempts):
            message.attempt = attempt
            if message.job in cancelled:
                self.stats.dropped += 1
                self._drop(message)
                continue
            if attempt > self.settings.max_attempts:
                self._fail(message, f"gave up after {attempt - 1} attempts", dead=True)
                continue
            info = self._round_info(message.job, message.round_id)
            if info is None:  # the round is over (answered elsewhere) or expired
                self._drop(message)
                continue
            try:
                problem = decode_problem(message.body, lambda digest, m=message: self.redis.get(
                    self.keys.blob(m.job, m.round_id, digest)))
            except QsurgeonError as error:
                self._fail(message, f"bad problem: {error}")
                continue
            groups.setdefault((info[0], message.stream, json.dumps(info[1], sort_keys=True)), []).append(
                (message, problem))
        for (solver, stream, params_json), items in groups.items():
            self._solve_group(solver, stream, json.loads(params_json), items, consumer)

    def _solve_group(self, solver: str, stream: str, params: dict[str, Any],
                     items: list[tuple[_Message, BlockProblem]], consumer: str) -> None:
        lease = Lease(self.redis, self.keys, stream, consumer, [message.message_id for message, _ in items],
                      jobs=[message.job for message, _ in items])
        _local.lease = lease
        problems = [problem for _, problem in items]
        started = time.perf_counter()
        try:
            solutions, reasons = solve_each_on_failure(problems, solver, params)
        except Exception as error:  # a crashing backend fails its blocks, never the worker
            log.exception("solver %s crashed on a batch of %d", solver, len(problems))
            solutions, reasons = [None] * len(problems), [f"solver crashed: {type(error).__name__}: {error}"] * len(problems)
        finally:
            _local.lease = None
        elapsed = time.perf_counter() - started
        self.stats.batches.append(len(problems))
        self.stats.solve_seconds += elapsed
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrbyfloat(self.keys.stats, "solve_seconds", elapsed)
        for (message, _), solution, reason in zip(items, solutions, reasons):
            if solution is None:
                self._fail(message, reason)
            else:
                meta = dict(solution.metadata, worker=self.name, attempt=message.attempt)
                solution = dataclasses.replace(solution, metadata=meta)
                self._finish(message, encode_result(solution), pipe)
                self.stats.solved += 1
        pipe.execute()
