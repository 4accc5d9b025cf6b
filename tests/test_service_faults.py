"""The service through a Redis outage, as real processes on a Redis of its own.

`qsurgeon serve` and two `qsurgeon worker`s talk to a `redis-server` this test starts
(append-only on). One MiniLM prune job meets two faults:

1. Redis is SIGKILLed mid-round and restarted from its append-only file: nothing is lost,
   every process rides the outage out on its retries.
2. Redis is SIGKILLed mid-round and restarted with only the job records (the queue's data,
   consumer group, round keys, answers, heartbeats and locks are gone): workers re-create
   their group after NOGROUP, the orchestrator sees the round vanish and sends it again.

The job must end `succeeded` with masks byte-identical to the embedded run and the same
block counts (no block applied twice, none failed), and both workers must still be running.
(The queue-level re-send itself is checked in tests/test_redis_queue.py, where it is
deterministic.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

redis = pytest.importorskip("redis")
torch = pytest.importorskip("torch")
pytest.importorskip("uvicorn")

from test_service_integration import assert_same_masks, downloaded_masks, free_port  # noqa: E402

from qsurgeon.client.sdk import Client  # noqa: E402

KEY = "faults-key-0123456789abcdef"
PREFIX = "qsfault"
OPTIONS = {
    "include": ["*layer.0.attention.self.query*"],
    "samples": 8, "seq_len": 16, "epochs": 2, "block_size": 64, "seed": 0,
    "solver": "sa", "solver_params": {"sweeps": 1000},
}
pytestmark = [pytest.mark.redis, pytest.mark.slow]


class PrivateRedis:
    """A redis-server process of this test's own, on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, folder: Path, *, appendonly: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always", "--save", ""],
            stdout=open(self.root / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def dump_records(url: str) -> dict[bytes, bytes]:
    """The job records of ``url`` (record, index, events), serialised by DUMP."""
    source = redis.Redis.from_url(url)
    dumped = {}
    for pattern in (f"{PREFIX}:job:*", f"{PREFIX}:jobs", f"{PREFIX}:events:*"):
        for key in source.scan_iter(match=pattern):
            dumped[key] = source.dump(key)
    return dumped


def records_only_rdb(dumped: dict[bytes, bytes], folder: Path) -> None:
    """An RDB file in ``folder`` holding only ``dumped``: what a Redis that lost the queue's
    data but kept the job records would load."""
    scratch = PrivateRedis(folder)
    scratch.start(folder, appendonly=False)
    target = redis.Redis.from_url(scratch.url)
    for key, value in dumped.items():
        target.restore(key, 0, value, replace=True)
    target.save()
    scratch.kill()


def spawn(root: Path, name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "QSURGEON_API_KEYS": KEY, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "qsurgeon.client.cli", *args],
                            stdout=open(root / f"{name}.log", "ab"), stderr=subprocess.STDOUT, env=env)


def wait_round_in_flight(client: Client, job_id: str, url: str, minimum_round: int, timeout: float = 120) -> None:
    """Until the job has done ``minimum_round`` rounds and a worker holds blocks of the next."""
    raw = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(job_id)
        assert not job.state.finished, job
        # answered messages are deleted from the stream, so what it still holds is unanswered
        if job.progress.round >= minimum_round and raw.xlen(f"{PREFIX}:blocks:sa") >= 8:
            return
        assert time.monotonic() < deadline, f"no round in flight after round {minimum_round}: {job}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference():
    from qsurgeon.server.engine.run import PruneOptions, run_prune

    result = run_prune(PruneOptions(model="builtin:minilm", **OPTIONS))
    return {name: mask.clone() for name, mask in result.masks.items()}, result.report["icbs"]["blocks"]


def test_redis_restart_with_and_without_its_data_mid_job(tmp_path, reference):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    want_masks, want_blocks = reference
    server_redis = PrivateRedis(tmp_path)
    server_redis.start(tmp_path / "aof", appendonly=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    processes = [
        spawn(tmp_path, "server", "serve", "--redis", server_redis.url, "--data", str(tmp_path / "data"),
              "--port", str(port), "--prefix", PREFIX, "--visibility-timeout", "3"),
        *[spawn(tmp_path, name, "worker", "--redis", server_redis.url, "--prefix", PREFIX, "--backends", "sa",
                "--visibility-timeout", "3", "--batch-size", "16", "--name", name) for name in ("wa", "wb")],
    ]
    try:
        with Client(url, api_key=KEY, timeout=30) as client:
            deadline = time.monotonic() + 90
            while not client.ready():
                assert all(p.poll() is None for p in processes), (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "service did not become ready"
                time.sleep(0.2)
            job = client.submit_prune("builtin:minilm", **OPTIONS)

            # 1. restart from the append-only file while a round is in flight
            wait_round_in_flight(client, job.id, server_redis.url, 0)
            server_redis.kill()
            time.sleep(1.5)
            server_redis.start(tmp_path / "aof", appendonly=True)

            # 2. restart without the queue's data while a later round is in flight
            seen = client.get(job.id).progress.round
            wait_round_in_flight(client, job.id, server_redis.url, seen + 1)
            records = dump_records(server_redis.url)
            server_redis.kill()
            records_only_rdb(records, tmp_path / "lost")
            server_redis.start(tmp_path / "lost", appendonly=False)

            done = client.wait(job, timeout=240, poll=0.3, raise_on_failure=False)
            assert done.state.value == "succeeded", (done, (tmp_path / "server.log").read_text()[-3000:])
            assert_same_masks(downloaded_masks(client, job.id, tmp_path / "masks"), want_masks)
            assert done.metrics["icbs"]["blocks"] == want_blocks  # every block applied once
            assert done.progress.blocks_failed == 0 and done.progress.blocks_sent == sum(want_blocks.values())
        for process in processes[1:]:
            assert process.poll() is None, "a worker died in the outage"
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if server_redis.process is not None and server_redis.process.poll() is None:
            server_redis.kill()
