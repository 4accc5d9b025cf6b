"""Every Redis key the queue uses, declared once, so the orchestrator and the workers agree.

Every key starts with the settings' prefix, so tests and tenants never collide:

``{p}:blocks:{solver}``        one stream per solver, consumer group :data:`GROUP`; a
                               message names its job, round and block and holds the
                               problem (:func:`qsurgeon.worker.block.codec.encode_problem`)
``{p}:round:{job}:{round}``    hash of what the round's problems share: the solver
                               name and its parameters, stored once per round
``{p}:blob:{job}:{round}:{h}`` an array (≥ ``share_threshold`` bytes) that several
                               problems of the round hold byte-for-byte, stored once
                               and referenced by its digest from each message
                               (``{p}:blobs:{job}:{round}`` lists them for clean-up)
``{p}:res:{job}:{round}``      hash block id -> result (:func:`~qsurgeon.worker.block.codec.encode_result`);
                               written with HSETNX, so a second answer to the same
                               block (a reclaimed message solved twice) is ignored
``{p}:note:{job}:{round}``     list the orchestrator blocks on (a wake-up only)
``{p}:sent:{job}:{round}``     set of block ids already enqueued, so a resumed round
                               never enqueues a block twice
``{p}:attempts``               hash message id -> deliveries; past ``max_attempts``
                               a message goes to ``{p}:dead`` and its block fails
``{p}:cancelled:{job}``        present while a job is cancelled; workers drop its blocks
                               (TTL a day; a purge deletes it at once)
``{p}:workers``                sorted set worker name -> last heartbeat (unix s); entries
                               older than :data:`DEAD_WORKER_SECONDS` are pruned by every
                               live worker's heartbeat and by the orchestrator;
                               ``{p}:worker:{name}`` holds the worker's own description (TTL 30 s)
``{p}:remote:{message}``       what a backend recorded about a remote task of a message
``{p}:budget:{job}``           hash of what a job's remote blocks have spent (blocks sent,
                               QPU seconds, cost), shared by every worker of the job
``{p}:stats``                  hash of counters for ``/metrics`` (one per prefix, bounded)
``{p}:dead``                   stream of dead letters, capped at :data:`DEAD_LETTERS_KEPT`
``{p}:attempts``               (above) an entry lives until its message is answered or dropped

Who deletes what: the orchestrator deletes a round's keys when it collects the round and
every job's keys when the job is purged (or expires after the retention time); a worker's
answer never re-creates the keys of a finished round (the publish script checks the round
is still open). Every per-round key also carries a TTL of :data:`ROUND_TTL_SECONDS`, so
nothing outlives a vanished orchestrator for more than a day.
"""

from __future__ import annotations

import redis

#: The consumer group every worker reads the block streams through.
GROUP = "workers"
#: Round keys (and a backend's remote records) expire after this long even if their orchestrator vanished.
ROUND_TTL_SECONDS = 24 * 3600
#: A worker silent this long is removed from ``{p}:workers``.
DEAD_WORKER_SECONDS = 300
#: The dead-letter stream keeps about this many entries.
DEAD_LETTERS_KEPT = 10000


class Keys:
    """Names of every key of one prefix."""

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

    def cancelled(self, job: str) -> str:
        return f"{self.prefix}:cancelled:{job}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, name: str) -> str:
        return f"{self.prefix}:worker:{name}"

    def budget(self, job: str) -> str:
        return f"{self.prefix}:budget:{job}"

    def remote(self, message_id: str) -> str:
        return f"{self.prefix}:remote:{message_id}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


def job_keys(client: redis.Redis, keys: Keys, job: str) -> list[str]:
    """Every queue key of one job (its rounds' keys, cancel flag and budget), for a purge."""
    found = [keys.cancelled(job), keys.budget(job)]
    for pattern in ("round", "blob", "blobs", "res", "note", "sent"):
        found.extend(key.decode() for key in client.scan_iter(match=f"{keys.prefix}:{pattern}:{job}:*", count=1000))
    return found


def ensure_group(client: redis.Redis, stream: str) -> None:
    """Create the stream and its consumer group unless they exist (both ends may come first)."""
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise
