"""The remote-job cycle through a real worker and a real Redis: a job's budget is one
ledger shared by its rounds and workers, and a worker that dies while its remote task
runs leaves the task id in Redis, so the worker that takes the block over resumes the
task instead of paying for it again. Remote answers come from the SDKs' local testing
devices (MockDWaveSampler, Braket's LocalSimulator)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from redis_support import REDIS_URL, running_worker

pytest.importorskip("redis")
pytest.importorskip("dwave.system")
pytest.importorskip("braket.devices")

from dwave.system.testing import MockDWaveSampler  # noqa: E402

from qsurgeon.worker import BlockProblem  # noqa: E402
from qsurgeon.worker.queue.base import RoundRequest  # noqa: E402
from qsurgeon.worker.queue.consumer import Worker  # noqa: E402
from qsurgeon.worker.queue.keys import Keys  # noqa: E402
from qsurgeon.worker.queue.producer import RedisQueue  # noqa: E402
from qsurgeon.worker.queue.settings import QueueSettings, connect  # noqa: E402
from qsurgeon.worker.solvers.cloud.braket import BraketQAOASolver  # noqa: E402
from qsurgeon.worker.solvers.cloud.dwave import DWaveQPUSolver  # noqa: E402
from qsurgeon.worker.solvers.registry import register, unregister  # noqa: E402

pytestmark = pytest.mark.redis


def dense(size: int, k: int, seed: int, block_id: str) -> BlockProblem:
    A = np.random.default_rng(seed).normal(size=(size, size))
    return BlockProblem.dense(A + A.T, k=k, id=block_id)


def test_block_budget_is_shared_by_the_rounds_of_a_job(client, prefix):
    solver = DWaveQPUSolver(MockDWaveSampler(), name="dwave-qpu-redis")
    register(solver)
    try:
        settings = QueueSettings(prefix=prefix)
        queue = RedisQueue(REDIS_URL, settings=settings)
        params = {"max_remote_blocks": 2, "num_reads": 20, "seed": 1}
        with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=[solver.name], batch_size=8)):
            first = queue.run_round(RoundRequest("job-a", "r0", [dense(8, 4, i, f"a{i}") for i in range(3)],
                                                 solver.name, params))
            second = queue.run_round(RoundRequest("job-a", "r1", [dense(8, 4, 9, "a9")], solver.name, params))
            other = queue.run_round(RoundRequest("job-b", "r0", [dense(8, 4, 9, "b9")], solver.name, params))
        remote = [s.metadata["remote"] for s in first.solutions]
        assert sorted(remote) == [False, True, True]
        assert second.solutions[0].metadata["remote"] is False  # the job's two remote blocks are spent
        assert "max_remote_blocks=2" in second.solutions[0].metadata["fallback_reason"]
        assert other.solutions[0].metadata["remote"] is True  # another job has its own budget
        ledger = client.hgetall(Keys(prefix).budget("job-a"))
        assert float(ledger[b"remote_blocks"]) == 2 and float(ledger[b"qpu_seconds"]) > 0
        assert solver.ledger.spend("remote_blocks") == 0  # inside a worker, the solver's own ledger is unused
    finally:
        unregister(solver.name)


class CrashAfterSubmit(BraketQAOASolver):
    """Braket on the local simulator, whose worker dies (SystemExit) once while it waits."""

    def __init__(self) -> None:
        super().__init__(name="braket-crash-once", maxiter=10, shots=200)
        self.submissions = 0
        self.crashed = False

    def submit(self, prepared: Any, settings: Any, session: Any) -> tuple[str, Any]:
        self.submissions += 1
        return super().submit(prepared, settings, session)

    def is_done(self, handle: Any) -> bool:
        if not self.crashed:
            self.crashed = True
            raise SystemExit("the worker process dies here")
        return super().is_done(handle)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_restarted_worker_resumes_the_recorded_task_instead_of_paying_twice(client, prefix):
    solver = CrashAfterSubmit()
    register(solver)
    try:
        settings = QueueSettings(prefix=prefix, visibility_timeout=0.5)
        queue = RedisQueue(REDIS_URL, settings=settings)
        problem = dense(5, 2, 3, "blk")
        request = RoundRequest("job-c", "r0", [problem], solver.name, {"seed": 2})
        queue._enqueue(request, [problem])  # the round, sent without waiting for its answer
        doomed = Worker(connect(REDIS_URL), settings=settings, backends=[solver.name], name="doomed")
        doomed_thread = threading.Thread(target=doomed.run, daemon=True)
        doomed_thread.start()  # takes the block, submits it, records the task id, dies
        doomed_thread.join(timeout=20)
        assert solver.crashed and solver.submissions == 1 and doomed.stats.solved == 0
        recorded = [client.hgetall(key) for key in client.scan_iter(match=f"{prefix}:remote:*")]
        assert len(recorded) == 1 and recorded[0][b"task:blk"]
        with running_worker(Worker(connect(REDIS_URL), settings=settings, backends=[solver.name], name="heir")):
            result = queue.run_round(request)
        answer = result.solutions[0]
        assert result.failures == {} and problem.is_feasible(answer.x)
        assert solver.submissions == 1  # resumed, not resubmitted
        meta = answer.metadata
        assert meta["resumed"] is True and meta["remote"] is True and meta["worker"] == "heir"
        assert meta["remote_task_id"] == recorded[0][b"task:blk"].decode()
    finally:
        unregister(solver.name)
