"""The orchestrator's end of the Redis queue: send a round of block problems, wait, collect.

A round is enqueued as one message per problem on the solver's stream (key names in
:mod:`~qsurgeon.worker.queue.keys`), with the solver's parameters stored once per round
and arrays that several problems share stored once. Workers
(:mod:`~qsurgeon.worker.queue.consumer`) answer into the round's result hash. Every
returned answer is re-checked against the problem that was sent (feasibility and float64
energy), so a faulty worker can never push a bad mask into a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np
import redis

from qsurgeon.client.errors import QsurgeonError, UsageError
from qsurgeon.worker.block.codec import decode_result, encode_problem, problem_arrays
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.queue.base import RoundRequest, RoundResult
from qsurgeon.worker.queue.keys import ROUND_TTL_SECONDS, Keys, ensure_group
from qsurgeon.worker.queue.settings import QueueSettings, connect
from qsurgeon.worker.solve import checked

log = logging.getLogger(__name__)


class RoundAborted(QsurgeonError):
    """The round was interrupted (job cancelled or orchestrator stopping); nothing was applied."""


class NoWorker(QsurgeonError):
    """No live worker served the round's solver for ``no_worker_timeout`` seconds."""


#: the reason a worker gives a dead-lettered block (consumer.Worker.process)
DEAD_REASON = "gave up after"


def _digest(array: np.ndarray) -> str:
    hasher = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return hasher.hexdigest()[:32]


def shared_arrays(problems: Sequence[BlockProblem], threshold: int) -> tuple[dict[int, str], dict[str, bytes]]:
    """Arrays of at least ``threshold`` bytes that two or more problems hold byte-for-byte.

    Returns ``id(array) -> digest`` (the ``shared`` argument of
    :func:`~qsurgeon.worker.block.codec.encode_problem`) and ``digest -> bytes`` to store once.
    """
    by_digest: dict[str, list[np.ndarray]] = {}
    for problem in problems:
        for array in problem_arrays(problem).values():
            if array.nbytes >= threshold:
                by_digest.setdefault(_digest(array), []).append(array)
    references: dict[int, str] = {}
    blobs: dict[str, bytes] = {}
    for digest, arrays in by_digest.items():
        if len(arrays) > 1:
            blobs[digest] = np.ascontiguousarray(arrays[0]).tobytes()
            for array in arrays:
                references[id(array)] = digest
    return references, blobs


class RedisQueue:
    """The :class:`~qsurgeon.worker.queue.base.Queue` of the service: workers solve, we wait.

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

    def run_round(self, request: RoundRequest) -> RoundResult:
        if self.namespace is not None:
            request = replace(request, job_id=self.namespace, round_id=f"{request.job_id}:{request.round_id}")
        problems = list(request.problems)
        ids = [problem.id for problem in problems]
        if len(set(ids)) != len(ids) or any(not block_id for block_id in ids):
            raise UsageError("every problem of a round needs a unique, non-empty id")
        failures = self._enqueue(request, problems)
        resent = self._wait(request, problems, failures)
        result = self._collect(request, problems, failures)
        result.resent = resent
        return result

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
            if queued % 256 == 0:  # each chunk carries its own TTL and count: a crash mid-round leaves both right
                pipe.expire(keys.sent(job, round_id), ttl)
                pipe.hincrby(keys.stats, "blocks_queued", 256)
                pipe.execute()
        pipe.expire(keys.sent(job, round_id), ttl)
        pipe.hincrby(keys.stats, "blocks_queued", queued % 256)
        pipe.execute()
        return failures

    def _wait(self, request: RoundRequest, problems: list[BlockProblem], failures: dict[str, str]) -> int:
        """Block until every sent problem has an answer; returns how many blocks were re-sent.

        The round's hash exists from enqueue to collection; if it vanishes, Redis lost its
        data (restarted without persistence): the unanswered blocks are sent again (answers
        are keyed by block, so none is applied twice). With ``no_worker_timeout``, a round
        that sees no live worker for its solver that long raises :class:`NoWorker`.
        """
        results_key = self.keys.results(request.job_id, request.round_id)
        note_key = self.keys.note(request.job_id, request.round_id)
        round_key = self.keys.round(request.job_id, request.round_id)
        expected = len(problems) - len(failures)
        deadline = None if self.settings.round_timeout is None else time.monotonic() + self.settings.round_timeout
        resent = 0
        worker_seen = time.monotonic()
        next_worker_check = 0.0
        while True:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hlen(results_key)
            pipe.exists(round_key)
            answered, open_round = pipe.execute()
            if answered >= expected:
                return resent
            if not open_round:
                log.warning("round %s of job %s vanished from Redis; sending its unanswered blocks again",
                            request.round_id, request.job_id)
                before = int(self.redis.hlen(results_key))
                self._enqueue(request, problems)
                resent += expected - before
                continue
            if self.should_stop is not None and self.should_stop():
                raise RoundAborted(f"round {request.round_id} of job {request.job_id} was interrupted")
            if deadline is not None and time.monotonic() > deadline:
                log.warning("round %s timed out with %d of %d answers", request.round_id, answered, expected)
                return resent
            limit = self.settings.no_worker_timeout
            if limit is not None and time.monotonic() >= next_worker_check:
                next_worker_check = time.monotonic() + min(2.0, limit / 4)
                if self._served(request.solver):
                    worker_seen = time.monotonic()
                elif time.monotonic() - worker_seen > limit:
                    raise NoWorker(f"no worker serves solver {request.solver!r}: none was seen for {limit:g} s "
                                   f"(start `qsurgeon worker --backends {request.solver}`)")
            # the list only wakes us up; the hash is the truth, so a lost wake-up costs ≤ 0.5 s
            self.redis.blpop([note_key], timeout=0.5)

    def _served(self, solver: str) -> bool:
        from qsurgeon.worker.queue.control import QueueControl

        return QueueControl(self.redis, self.settings).workers_by_solver().get(solver, 0) > 0

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
            try:
                solution, reason = decode_result(value)
                if solution is not None:
                    solution = checked(problem, solution)  # never trust a worker's answer
            except QsurgeonError as error:
                solution, reason = None, f"worker answer rejected: {error}"
            result.solutions.append(solution)
            if solution is None:
                result.failures[problem.id] = reason
                result.dead += reason.startswith(DEAD_REASON)
            elif int(solution.metadata.get("attempt", 1) or 1) > 1:
                result.retried += 1
        self._cleanup(job, round_id)
        return result

    def _cleanup(self, job: str, round_id: str) -> None:
        keys = self.keys
        blob_keys = [keys.blob(job, round_id, digest.decode()) for digest in self.redis.smembers(keys.blobs(job, round_id))]
        self.redis.delete(keys.results(job, round_id), keys.note(job, round_id), keys.sent(job, round_id),
                          keys.round(job, round_id), keys.blobs(job, round_id), *blob_keys)
