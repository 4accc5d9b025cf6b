"""The service Queue: rounds of block problems carried by Redis Streams.

Layout of the keyspace (every key starts with a configurable prefix, so tests and
tenants never collide):

``{p}:blocks:{solver}``        one stream per solver, consumer group ``workers``; a
                               message names its job, round and block and holds the
                               problem as an envelope (see :func:`encode_problem`)
``{p}:round:{job}:{round}``    hash of what the round's problems share: the solver
                               name and its parameters, stored once per round
``{p}:blob:{job}:{round}:{h}`` an array (≥ ``share_threshold`` bytes) that several
                               problems of the round hold byte-for-byte, stored once
                               and referenced by its SHA-256 from each envelope
                               (``{p}:blobs:{job}:{round}`` lists them for clean-up)
``{p}:res:{job}:{round}``      hash block id -> result; written with HSETNX, so a
                               second answer to the same block (a reclaimed message
                               solved twice) is ignored
``{p}:note:{job}:{round}``     list the orchestrator blocks on (a wake-up only)
``{p}:sent:{job}:{round}``     set of block ids already enqueued, so a resumed round
                               never enqueues a block twice
``{p}:attempts``               hash message id -> deliveries; past ``max_attempts``
                               a message goes to ``{p}:dead`` and its block fails
``{p}:cancelled``              set of cancelled job ids; workers drop their blocks
``{p}:workers``                sorted set worker name -> last heartbeat (unix s)
``{p}:stats``                  hash of counters for ``/metrics``

Results are ``b"OK" + BlockSolution.to_bytes()`` or ``b"ER" + reason``. The orchestrator
re-checks every returned answer against the problem it sent (feasibility and float64
energy), so a faulty worker can never push a bad mask into a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import redis

from qsurgeon.client.errors import InvalidProblemError, QsurgeonError, UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.queue.base import RoundRequest, RoundResult
from qsurgeon.worker.solve import checked

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "qsurgeon"
GROUP = "workers"
#: round keys expire after this long even if their orchestrator vanished
ROUND_TTL_SECONDS = 24 * 3600
_ENVELOPE_MAGIC = b"QSRE"
_OK = b"OK"
_ERROR = b"ER"


class RoundAborted(QsurgeonError):
    """The round was interrupted (job cancelled or orchestrator stopping); nothing was applied."""


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


class Keys:
    """Names of every key of one prefix: one place, so worker and orchestrator agree."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, solver: str) -> str:
        return f"{self.prefix}:blocks:{solver}"

    def round(self, job: str, round_id: str) -> str:
        return f"{self.prefix}:round:{job}:{round_id}"

    def blob(self, job: str, round_id: str, digest: str) -> str:
        return f"{self.prefix}:blob:{job}:{round_id}:{digest}"

    def blobs(self, job: str, round_id: str) -> str:
        return f"{self.prefix}:blobs:{job}:{round_id}"

    def results(self, job: str, round_id: str) -> str:
        return f"{self.prefix}:res:{job}:{round_id}"

    def note(self, job: str, round_id: str) -> str:
        return f"{self.prefix}:note:{job}:{round_id}"

    def sent(self, job: str, round_id: str) -> str:
        return f"{self.prefix}:sent:{job}:{round_id}"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}:attempts"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def cancelled(self) -> str:
        return f"{self.prefix}:cancelled"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def remote(self, message_id: str) -> str:
        return f"{self.prefix}:remote:{message_id}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


# Publish one result and acknowledge its message atomically. HSETNX makes duplicates no-ops;
# the wake-up is pushed only for the first answer; XDEL keeps the stream from growing.
PUBLISH_SCRIPT = """
local fresh = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if fresh == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[3] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[3])
  redis.call('XDEL', KEYS[3], ARGV[3])
  redis.call('HDEL', KEYS[4], ARGV[3])
end
return fresh
"""


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client for ``url`` (bytes responses); raises UsageError for a malformed URL."""
    try:
        return redis.Redis.from_url(url or DEFAULT_REDIS_URL, socket_connect_timeout=5, health_check_interval=30)
    except ValueError as error:
        raise UsageError(f"invalid Redis URL {url!r}: {error}") from None


def ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


# ---------------------------------------------------------------------- problem envelope
def _problem_arrays(problem: BlockProblem) -> dict[str, np.ndarray]:
    arrays = {"group_of": problem.group_of, "counts": problem.counts}
    for name in ("Q", "F", "c", "x0"):
        value = getattr(problem, name)
        if value is not None:
            arrays[name] = np.ascontiguousarray(value)
    return arrays


def _digest(array: np.ndarray) -> str:
    hasher = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return hasher.hexdigest()[:32]


def encode_problem(problem: BlockProblem, shared: Mapping[int, str] | None = None) -> bytes:
    """Magic, header length, JSON header, inline arrays. ``shared`` maps id(array) -> digest
    for arrays stored once per round; those are referenced, not copied."""
    shared = shared or {}
    specs, blobs = [], []
    for name, array in _problem_arrays(problem).items():
        spec: dict[str, Any] = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        if id(array) in shared:
            spec["ref"] = shared[id(array)]
        else:
            blobs.append(array.tobytes())
        specs.append(spec)
    header = json.dumps({"id": problem.id, "offset": problem.offset, "meta": dict(problem.meta), "arrays": specs},
                        separators=(",", ":")).encode()
    return b"".join([_ENVELOPE_MAGIC, struct.pack("<I", len(header)), header, *blobs])


_ALLOWED_DTYPES = {"<f4", "<f8", "<i4", "<i8", "|u1", "<u1"}


def decode_problem(payload: bytes, fetch_blob: Callable[[str], bytes | None]) -> BlockProblem:
    """Rebuild and fully validate a problem (workers never trust a message)."""
    if payload[:4] != _ENVELOPE_MAGIC or len(payload) < 8:
        raise InvalidProblemError("message is not a qsurgeon problem envelope")
    (length,) = struct.unpack_from("<I", payload, 4)
    try:
        header = json.loads(payload[8 : 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidProblemError("problem envelope header is not JSON") from None
    position = 8 + length
    arrays: dict[str, np.ndarray] = {}
    for spec in header.get("arrays", []):
        if spec["dtype"] not in _ALLOWED_DTYPES:
            raise InvalidProblemError(f"array dtype {spec['dtype']!r} is not allowed")
        dtype = np.dtype(spec["dtype"])
        shape = tuple(int(n) for n in spec["shape"])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if "ref" in spec:
            data = fetch_blob(str(spec["ref"]))
            if data is None:
                raise InvalidProblemError(f"shared array {spec['ref']} of the round is gone")
        else:
            data = payload[position : position + size]
            position += size
        if len(data) != size:
            raise InvalidProblemError("problem envelope is truncated")
        arrays[spec["name"]] = np.frombuffer(data, dtype=dtype).reshape(shape)
    if position != len(payload):
        raise InvalidProblemError("problem envelope has trailing bytes")
    common = dict(groups=arrays["group_of"], counts=arrays["counts"], offset=header["offset"],
                  x0=arrays.get("x0"), id=header.get("id", ""), meta=header.get("meta"))
    if "Q" in arrays:
        return BlockProblem.dense(arrays["Q"], symmetry_tolerance=0.0, **common)
    if "F" in arrays:
        return BlockProblem.factored(arrays["F"], arrays.get("c"), **common)
    raise InvalidProblemError("problem envelope holds neither Q nor F")


def shared_arrays(problems: Sequence[BlockProblem], threshold: int) -> tuple[dict[int, str], dict[str, bytes]]:
    """Arrays of at least ``threshold`` bytes that two or more problems hold byte-for-byte."""
    by_digest: dict[str, list[np.ndarray]] = {}
    for problem in problems:
        for array in _problem_arrays(problem).values():
            if array.nbytes >= threshold:
                by_digest.setdefault(_digest(array), []).append(array)
    references: dict[int, str] = {}
    blobs: dict[str, bytes] = {}
    for digest, arrays in by_digest.items():
        if len(arrays) > 1:
            blobs[digest] = arrays[0].tobytes()
            for array in arrays:
                references[id(array)] = digest
    return references, blobs


def encode_result(solution: BlockSolution | None, reason: str = "") -> bytes:
    return _OK + solution.to_bytes() if solution is not None else _ERROR + reason.encode()[:4000]


def decode_result(value: bytes) -> tuple[BlockSolution | None, str]:
    if value[:2] == _OK:
        return BlockSolution.from_bytes(value[2:]), ""
    return None, value[2:].decode(errors="replace")


# ---------------------------------------------------------------------- the queue
class RedisQueue:
    """The :class:`~qsurgeon.worker.queue.Queue` of the service: workers solve, we wait.

    ``should_stop`` is polled while a round waits; when it returns True the round raises
    :class:`RoundAborted` and nothing of it is applied, so a resumed job redoes it whole.
    ``namespace`` (the service's job id) replaces the engine's own job ids in every key
    and message, so concurrent jobs never share a round and cancelling reaches all
    blocks of a job; the engine's job id then becomes part of the round id.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: QueueSettings | None = None,
        client: redis.Redis | None = None,
        should_stop: Callable[[], bool] | None = None,
        namespace: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.settings = settings or QueueSettings()
        self.keys = Keys(self.settings.prefix)
        self.redis = client if client is not None else connect(url)
        self.should_stop = should_stop
        self._publish = self.redis.register_script(PUBLISH_SCRIPT)

    # ------------------------------------------------------------------ producer side
    def run_round(self, request: RoundRequest) -> RoundResult:
        if self.namespace is not None:
            request = replace(request, job_id=self.namespace, round_id=f"{request.job_id}:{request.round_id}")
        problems = list(request.problems)
        ids = [problem.id for problem in problems]
        if len(set(ids)) != len(ids) or any(not block_id for block_id in ids):
            raise UsageError("every problem of a round needs a unique, non-empty id")
        failures = self._enqueue(request, problems)
        self._wait(request, problems, failures)
        return self._collect(request, problems, failures)

    def _enqueue(self, request: RoundRequest, problems: list[BlockProblem]) -> dict[str, str]:
        keys, settings = self.keys, self.settings
        job, round_id = request.job_id, request.round_id
        stream = keys.stream(request.solver)
        ensure_group(self.redis, stream)
        sent = {member.decode() for member in self.redis.smembers(keys.sent(job, round_id))}
        answered = {field.decode() for field in self.redis.hkeys(keys.results(job, round_id))}
        todo = [problem for problem in problems if problem.id not in sent and problem.id not in answered]
        references, blobs = shared_arrays(todo, settings.share_threshold)
        failures: dict[str, str] = {}
        pipe = self.redis.pipeline(transaction=False)
        ttl = ROUND_TTL_SECONDS
        pipe.hset(keys.round(job, round_id), mapping={
            "solver": request.solver, "params": json.dumps(dict(request.params)), "created": time.time(),
        })
        pipe.expire(keys.round(job, round_id), ttl)
        for digest, data in blobs.items():
            pipe.set(keys.blob(job, round_id, digest), data, ex=ttl)
            pipe.sadd(keys.blobs(job, round_id), digest)
        if blobs:
            pipe.expire(keys.blobs(job, round_id), ttl)
        queued = 0
        for problem in todo:
            envelope = encode_problem(problem, references)
            if len(envelope) > settings.max_message_bytes:
                failures[problem.id] = (f"problem is {len(envelope)} bytes, more than the message limit "
                                        f"{settings.max_message_bytes}")
                continue
            pipe.xadd(stream, {"job": job, "round": round_id, "block": problem.id, "body": envelope})
            pipe.sadd(keys.sent(job, round_id), problem.id)
            queued += 1
            if queued % 256 == 0:
                pipe.execute()
        pipe.expire(keys.sent(job, round_id), ttl)
        pipe.hincrby(keys.stats, "blocks_queued", queued)
        pipe.execute()
        return failures

    def _wait(self, request: RoundRequest, problems: list[BlockProblem], failures: dict[str, str]) -> None:
        results_key = self.keys.results(request.job_id, request.round_id)
        note_key = self.keys.note(request.job_id, request.round_id)
        expected = len(problems) - len(failures)
        deadline = None if self.settings.round_timeout is None else time.monotonic() + self.settings.round_timeout
        while True:
            answered = self.redis.hlen(results_key)
            if answered >= expected:
                return
            if self.should_stop is not None and self.should_stop():
                raise RoundAborted(f"round {request.round_id} of job {request.job_id} was interrupted")
            if deadline is not None and time.monotonic() > deadline:
                log.warning("round %s timed out with %d of %d answers", request.round_id, answered, expected)
                return
            # the list only wakes us up; the hash is the truth, so a lost wake-up costs ≤ 0.5 s
            self.redis.blpop([note_key], timeout=0.5)

    def _collect(self, request: RoundRequest, problems: list[BlockProblem], failures: dict[str, str]) -> RoundResult:
        keys = self.keys
        job, round_id = request.job_id, request.round_id
        raw = {field.decode(): value for field, value in self.redis.hgetall(keys.results(job, round_id)).items()}
        result = RoundResult(solutions=[], failures=dict(failures))
        for problem in problems:
            if problem.id in failures:
                result.solutions.append(None)
                continue
            value = raw.get(problem.id)
            if value is None:
                result.solutions.append(None)
                result.failures[problem.id] = "no answer before the round timed out"
                continue
            solution, reason = decode_result(value)
            if solution is not None:
                try:
                    solution = checked(problem, solution)  # never trust a worker's answer
                except QsurgeonError as error:
                    solution, reason = None, f"worker answer rejected: {error}"
            result.solutions.append(solution)
            if solution is None:
                result.failures[problem.id] = reason
        self._cleanup(job, round_id)
        return result

    def _cleanup(self, job: str, round_id: str) -> None:
        keys = self.keys
        blob_keys = [keys.blob(job, round_id, digest.decode()) for digest in self.redis.smembers(keys.blobs(job, round_id))]
        self.redis.delete(keys.results(job, round_id), keys.note(job, round_id), keys.sent(job, round_id),
                          keys.round(job, round_id), keys.blobs(job, round_id), *blob_keys)

    # ------------------------------------------------------------------ control
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
