"""RedisQueue + Worker against the real Redis: round trips, sharing, reclaim, dead letters,
claim renewal, cancellation, limits. Each test uses its own key prefix."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from redis_support import REDIS_URL, running_worker

redis = pytest.importorskip("redis")

from qsurgeon.client.errors import InvalidProblemError, UsageError  # noqa: E402
from qsurgeon.worker.queue.consumer import Worker, current_lease  # noqa: E402
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution  # noqa: E402
from qsurgeon.worker.block.codec import decode_problem, encode_problem, encode_result  # noqa: E402
from qsurgeon.worker.queue.base import RoundRequest  # noqa: E402
from qsurgeon.worker.queue.control import QueueControl  # noqa: E402
from qsurgeon.worker.queue.inprocess import InProcessQueue  # noqa: E402
from qsurgeon.worker.queue.producer import RedisQueue, RoundAborted  # noqa: E402
from qsurgeon.worker.queue.settings import QueueSettings, connect  # noqa: E402
from qsurgeon.worker.solve import solve  # noqa: E402
from qsurgeon.worker.solvers.base import Capabilities, Solver  # noqa: E402
from qsurgeon.worker.solvers.registry import register, unregister  # noqa: E402

pytestmark = pytest.mark.redis


def random_problem(rng: np.random.Generator, size: int, k: int, block_id: str, *, factored: bool = False,
                   Q: np.ndarray | None = None) -> BlockProblem:
    x0 = np.zeros(size, np.uint8)
    x0[rng.choice(size, k, replace=False)] = 1
    if factored:
        return BlockProblem.factored(rng.normal(size=(3, size)), rng.random(size), k=k, x0=x0, id=block_id)
    if Q is None:
        A = rng.normal(size=(size, size))
        Q = (A + A.T).astype(np.float32)
    return BlockProblem.dense(Q, k=k, x0=x0, id=block_id, meta={"row": block_id})


def brute_force(problem: BlockProblem) -> float:
    size = problem.num_variables
    best = np.inf
    for pattern in range(1 << size):
        x = np.array([(pattern >> i) & 1 for i in range(size)])
        if problem.is_feasible(x):
            best = min(best, problem.energy(x))
    return best


def test_round_trip_matches_in_process_and_brute_force(client, prefix):
    rng = np.random.default_rng(0)
    problems = [random_problem(rng, 10, 4, f"b{i}", factored=i % 2 == 1) for i in range(12)]
    settings = QueueSettings(prefix=prefix)
    request = RoundRequest(job_id="j1", round_id="r0", problems=problems, solver="exhaustive")
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"], batch_size=5)) as worker:
        result = RedisQueue(REDIS_URL, settings=settings).run_round(request)
    expected = InProcessQueue().run_round(request)
    assert result.failures == {}
    for problem, got, want in zip(problems, result.solutions, expected.solutions):
        assert got is not None and got.problem_id == problem.id
        np.testing.assert_array_equal(got.x, want.x)
        assert got.energy == pytest.approx(brute_force(problem), rel=1e-9, abs=1e-12)
        assert got.metadata["worker"] == worker.name
    assert max(worker.stats.batches) > 1  # it really took several messages at once
    # the round's keys are gone once collected; nothing is left pending
    assert not list(client.scan_iter(match=f"{prefix}:res:*"))
    assert QueueControl(client, settings).pending_count("exhaustive") == 0


def test_envelope_round_trips_and_refuses_garbage():
    rng = np.random.default_rng(1)
    for problem in (random_problem(rng, 8, 3, "d"), random_problem(rng, 8, 3, "f", factored=True)):
        back = decode_problem(encode_problem(problem), lambda digest: None)
        assert back.id == problem.id and back.offset == problem.offset and dict(back.meta) == dict(problem.meta)
        np.testing.assert_array_equal(back.dense_Q(), problem.dense_Q())
        np.testing.assert_array_equal(back.x0, problem.x0)
    payload = encode_problem(random_problem(rng, 8, 3, "d"))
    with pytest.raises(InvalidProblemError):
        decode_problem(b"junk" + payload[4:], lambda digest: None)
    with pytest.raises(InvalidProblemError):
        decode_problem(payload[:-3], lambda digest: None)
    with pytest.raises(InvalidProblemError):
        decode_problem(payload + b"x", lambda digest: None)


def test_shared_matrices_are_stored_once(client, prefix):
    rng = np.random.default_rng(2)
    A = rng.normal(size=(64, 64))
    Q = (A + A.T).astype(np.float32)  # 16 KiB, shared by every problem of the round
    problems = [random_problem(rng, 64, 20, f"s{i}", Q=Q) for i in range(6)]
    settings = QueueSettings(prefix=prefix, share_threshold=4096)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id="j2", round_id="r0", problems=problems, solver="exhaustive")
    queue._enqueue(request, problems)
    blobs = list(client.scan_iter(match=f"{prefix}:blob:*"))
    assert len(blobs) == 1 and client.strlen(blobs[0]) == Q.nbytes
    entries = client.xrange(queue.keys.stream("exhaustive"))
    assert len(entries) == 6 and all(len(fields[b"body"]) < Q.nbytes / 4 for _, fields in entries)
    worker = Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])
    messages = worker._read("w")
    decoded = decode_problem(messages[0].body, lambda d: client.get(queue.keys.blob("j2", "r0", d)))
    np.testing.assert_array_equal(decoded.Q, Q)
    queue._cleanup("j2", "r0")  # what collecting the round does: the shared blob goes too
    assert not list(client.scan_iter(match=f"{prefix}:blob*"))


def _one_block_read(prefix: str, seed: int, job: str):
    """A round of one block enqueued, and a worker holding its message (not yet answered)."""
    problem = random_problem(np.random.default_rng(seed), 6, 2, job)
    settings = QueueSettings(prefix=prefix)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id=job, round_id="r0", problems=[problem], solver="exhaustive")
    queue._enqueue(request, [problem])
    worker = Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])
    return problem, queue, request, worker, worker._read("w")[0]


def test_duplicate_results_are_ignored(client, prefix):
    problem, queue, request, worker, message = _one_block_read(prefix, 3, "j3")
    right = solve(problem, "exhaustive")
    wrong_x = problem.x0 if not np.array_equal(problem.x0, right.x) else 1 - problem.x0
    wrong = BlockSolution(x=wrong_x, energy=0.0, solver="late", problem_id=problem.id)
    worker._finish(message, encode_result(right))
    worker._finish(message, encode_result(wrong))  # a reclaimed copy answering late
    result = queue._collect(request, [problem], {})
    np.testing.assert_array_equal(result.solutions[0].x, right.x)
    assert result.solutions[0].solver == "exhaustive"


def test_crashed_workers_messages_are_reclaimed(client, prefix):
    rng = np.random.default_rng(4)
    problems = [random_problem(rng, 8, 3, f"c{i}") for i in range(4)]
    settings = QueueSettings(prefix=prefix, visibility_timeout=0.3)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id="j4", round_id="r0", problems=problems, solver="exhaustive")
    queue._enqueue(request, problems)
    ghost = Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])
    taken = ghost._read("ghost")  # takes every message, counts the delivery, then "dies"
    ghost.count_attempts(taken)
    assert len(taken) == 4 and QueueControl(client, settings).pending_count("exhaustive") == 4
    time.sleep(0.4)
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])) as rescuer:
        result = queue.run_round(request)
    assert result.failures == {} and rescuer.stats.solved == 4
    for problem, solution in zip(problems, result.solutions):
        assert solution.energy == pytest.approx(brute_force(problem), rel=1e-9, abs=1e-12)


def test_dead_letter_after_max_attempts(client, prefix):
    rng = np.random.default_rng(5)
    problems = [random_problem(rng, 8, 3, "poison"), random_problem(rng, 8, 3, "fine")]
    settings = QueueSettings(prefix=prefix, visibility_timeout=0.2, max_attempts=2)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id="j5", round_id="r0", problems=problems, solver="exhaustive")
    queue._enqueue(request, problems[:1])  # the poison block alone first
    ghost = Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])
    for _ in range(2):  # two deliveries that each "crash" before answering
        time.sleep(0.25)
        taken = ghost._reclaim("ghost") or ghost._read("ghost")
        assert [m.block for m in taken] == ["poison"]
        ghost.count_attempts(taken)
    time.sleep(0.25)
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])):
        result = queue.run_round(request)
    assert result.solutions[0] is None and "gave up after 2 attempts" in result.failures["poison"]
    assert result.solutions[1] is not None
    control = QueueControl(client, settings)
    dead = control.dead_letters()
    assert [(d["job"], d["block"]) for d in dead] == [("j5", "poison")]
    assert control.stats()["blocks_dead"] == 1


class SlowRemoteSolver(Solver):
    """Waits like a remote service would, renewing its claim and recording a task id."""

    capabilities = Capabilities(name="slow-remote-test", description="test", max_variables=64,
                                constraints="native", device="remote")

    def __init__(self) -> None:
        self.calls = 0
        self.seen_records: list[dict[str, str]] = []
        self.renewed = 0

    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        self.calls += 1
        lease = current_lease()
        assert lease is not None
        self.seen_records.append(lease.recorded)
        lease.record("task_id", f"remote-{problem.id}")
        for _ in range(12):  # 1.2 s of waiting, far past the 0.3 s visibility timeout
            time.sleep(0.1)
            self.renewed += lease.renew()
        return solve(problem, "exhaustive")


def test_claim_renewal_keeps_slow_messages(client, prefix):
    solver = SlowRemoteSolver()
    register(solver)
    try:
        rng = np.random.default_rng(6)
        problem = random_problem(rng, 8, 3, "slow")
        settings = QueueSettings(prefix=prefix, visibility_timeout=0.3)
        queue = RedisQueue(REDIS_URL, settings=settings)
        request = RoundRequest(job_id="j6", round_id="r0", problems=[problem], solver=solver.name)
        first = Worker(connect(REDIS_URL), settings=settings, backends=[solver.name], name="first")
        second = Worker(connect(REDIS_URL), settings=settings, backends=[solver.name], name="second")
        with running_worker(first), running_worker(second):
            result = queue.run_round(request)
        assert result.failures == {}
        assert solver.calls == 1  # nobody reclaimed it while it was being renewed
        assert solver.renewed >= 10
        assert first.stats.solved + second.stats.solved == 1
        # the recorded task id survives for a retry; a fresh lease on the same message sees it
        stored = list(client.scan_iter(match=f"{prefix}:remote:*"))
        assert len(stored) == 1 and client.hget(stored[0], "task_id") == b"remote-slow"
    finally:
        unregister(solver.name)


def test_cancelled_jobs_blocks_are_dropped(client, prefix):
    rng = np.random.default_rng(7)
    problems = [random_problem(rng, 8, 3, f"x{i}") for i in range(3)]
    settings = QueueSettings(prefix=prefix, round_timeout=1.0)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id="j7", round_id="r0", problems=problems, solver="exhaustive")
    control = QueueControl(client, settings)
    control.cancel("j7")
    assert control.is_cancelled("j7") and not control.is_cancelled("j8")
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])) as worker:
        result = queue.run_round(request)
    assert worker.stats.dropped == 3 and worker.stats.solved == 0
    assert result.solutions == [None, None, None]
    assert control.pending_count("exhaustive") == 0


def test_should_stop_aborts_the_round_and_resume_does_not_requeue(client, prefix):
    rng = np.random.default_rng(8)
    problems = [random_problem(rng, 8, 3, f"y{i}") for i in range(3)]
    settings = QueueSettings(prefix=prefix)
    request = RoundRequest(job_id="j8", round_id="r0", problems=problems, solver="exhaustive")
    with pytest.raises(RoundAborted):
        RedisQueue(REDIS_URL, settings=settings, should_stop=lambda: True).run_round(request)
    stream = f"{prefix}:blocks:exhaustive"
    assert client.xlen(stream) == 3
    resumed = RedisQueue(REDIS_URL, settings=settings)
    resumed._enqueue(request, problems)  # the orchestrator restarted and runs the same round again
    assert client.xlen(stream) == 3  # nothing enqueued twice
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])):
        result = resumed.run_round(request)
    assert result.failures == {} and all(s is not None for s in result.solutions)


def test_limits_and_bad_requests(client, prefix):
    rng = np.random.default_rng(9)
    big = random_problem(rng, 40, 5, "big")
    small = random_problem(rng, 6, 2, "small")
    settings = QueueSettings(prefix=prefix, max_message_bytes=2048)
    queue = RedisQueue(REDIS_URL, settings=settings)
    request = RoundRequest(job_id="j9", round_id="r0", problems=[big, small], solver="exhaustive")
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])):
        result = queue.run_round(request)
    assert result.solutions[0] is None and "message limit" in result.failures["big"]
    assert result.solutions[1] is not None
    with pytest.raises(UsageError):
        queue.run_round(RoundRequest(job_id="j9", round_id="r1", problems=[small, small], solver="exhaustive"))
    with pytest.raises(UsageError):
        QueueSettings(prefix="bad prefix")


def test_too_large_for_solver_fails_the_block_not_the_worker(client, prefix):
    rng = np.random.default_rng(10)
    problems = [random_problem(rng, 30, 4, "huge"), random_problem(rng, 8, 3, "ok")]
    settings = QueueSettings(prefix=prefix)
    with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])):
        result = RedisQueue(REDIS_URL, settings=settings).run_round(
            RoundRequest(job_id="j10", round_id="r0", problems=problems, solver="exhaustive"))
    assert result.solutions[0] is None and "at most 24" in result.failures["huge"]
    assert result.solutions[1] is not None


@pytest.mark.slow
def test_worker_cli_heartbeats_and_exits_cleanly_on_sigterm(client, prefix):
    command = [sys.executable, "-m", "qsurgeon.client.cli", "worker", "--redis", REDIS_URL, "--prefix", prefix,
               "--backends", "exhaustive", "--concurrency", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        queue = RedisQueue(REDIS_URL, settings=QueueSettings(prefix=prefix))
        control = QueueControl(client, QueueSettings(prefix=prefix))
        deadline = time.monotonic() + 60
        while not control.live_workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(control.live_workers()) == 1
        rng = np.random.default_rng(11)
        problem = random_problem(rng, 8, 3, "cli")
        result = queue.run_round(RoundRequest(job_id="j11", round_id="r0", problems=[problem], solver="exhaustive"))
        assert result.solutions[0].energy == pytest.approx(brute_force(problem), rel=1e-9, abs=1e-12)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert control.live_workers() == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_late_answers_never_recreate_a_collected_round(client, prefix):
    problem, queue, request, worker, message = _one_block_read(prefix, 31, "j31")
    worker._finish(message, encode_result(solve(problem, "exhaustive")))
    queue._collect(request, [problem], {})  # collected: the round's keys are gone
    worker._finish(message, encode_result(solve(problem, "exhaustive")))  # a reclaimed copy answers late
    assert not list(client.scan_iter(match=f"{prefix}:res:*")) and not list(client.scan_iter(match=f"{prefix}:note:*"))
    assert QueueControl(client, QueueSettings(prefix=prefix)).stats()["blocks_solved"] == 1  # counted once


def test_round_lost_with_redis_data_is_sent_again(tmp_path):
    """A private redis-server is SIGKILLed mid-round and restarted empty: the worker re-creates
    its group after NOGROUP, the orchestrator sees the round vanish and sends it again, and the
    answers equal those of an undisturbed round."""
    import shutil as _shutil

    if _shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from test_service_faults import PrivateRedis

    server = PrivateRedis(tmp_path)
    server.start(tmp_path / "a", appendonly=False)
    settings = QueueSettings(prefix="lost", visibility_timeout=2)
    rng = np.random.default_rng(32)
    problems = [random_problem(rng, 48, 24, f"b{i}") for i in range(24)]
    request = RoundRequest(job_id="j32", round_id="r0", problems=problems, solver="sa",
                           params={"sweeps": 3000, "seed": 5})
    want = InProcessQueue().run_round(request)
    queue = RedisQueue(server.url, settings=settings)
    answer: dict[str, Any] = {}
    try:
        with running_worker(Worker(connect(server.url), settings=settings, backends=["sa"], batch_size=2)) as worker:
            thread = threading.Thread(target=lambda: answer.setdefault("result", queue.run_round(request)))
            thread.start()
            watcher = connect(server.url)
            deadline = time.monotonic() + 60
            while watcher.hlen("lost:res:j32:r0") < 2:
                assert time.monotonic() < deadline, "no answer came"
                time.sleep(0.01)
            server.kill()
            server.start(tmp_path / "b", appendonly=False)  # an empty Redis on the same port
            thread.join(timeout=120)
            assert not thread.is_alive()
            assert worker.stats.solved >= len(problems)
    finally:
        server.kill()
    result = answer["result"]
    assert result.resent > 0 and result.failures == {}
    for got, expected in zip(result.solutions, want.solutions):
        np.testing.assert_array_equal(got.x, expected.x)
