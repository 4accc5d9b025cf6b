"""Amazon Braket backend on Braket's LocalSimulator (and its analog-only simulator as a
device that refuses circuits), costed by Braket's Tracker."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("braket.devices")

from braket.devices import LocalSimulator  # noqa: E402

from qsurgeon.client.errors import UsageError  # noqa: E402
from qsurgeon.worker import BlockProblem, solve  # noqa: E402
from qsurgeon.worker.solvers.cloud.braket import BraketQAOASolver, qaoa_circuit  # noqa: E402
from qsurgeon.worker.solvers.cloud.qaoa_plan import basis_costs, plan, qaoa_state  # noqa: E402
from qsurgeon.worker.solvers.registry import get_solver  # noqa: E402


def dense(size: int, k: int, seed: int, block_id: str = "b") -> BlockProblem:
    A = np.random.default_rng(seed).normal(size=(size, size))
    return BlockProblem.dense(A + A.T, k=k, id=block_id)


def test_circuit_prepares_the_state_the_angles_were_chosen_for():
    block = plan(dense(5, 2, 0), 1.0, reps=2, maxiter=20, seed=3)
    circuit = qaoa_circuit(block)
    circuit.state_vector()
    amplitudes = np.asarray(LocalSimulator().run(circuit, shots=0).result().values[0])
    order = np.arange(32)  # Braket's basis index has qubit 0 as its most significant bit
    ours = sum(((order >> (4 - qubit)) & 1) << qubit for qubit in range(5))
    matrix, offset = block.model.penalised_qubo()
    expected = qaoa_state(basis_costs(matrix, offset), block.gammas, block.betas, 5)
    assert abs(np.vdot(amplitudes[np.argsort(ours)], expected)) == pytest.approx(1.0, abs=1e-9)


def test_local_simulator_answer_carries_duration_shots_and_tracker_cost():
    solver = get_solver("braket-qaoa")  # default device: local:braket_sv
    problem = dense(6, 3, 1, "blk")
    answer = solve(problem, solver, seed=2, shots=400, maxiter=30)
    meta = answer.metadata
    assert problem.is_feasible(answer.x) and meta["remote"] and meta["backend"] == "braket"
    assert meta["shots"] == 400 and meta["device_id"] == "braket_sv"
    assert meta["task_duration_seconds"] is not None and meta["task_duration_seconds"] >= 0
    assert meta["cost_estimate_usd"] == 0.0 and meta["cost_error"] is None  # the Tracker: local tasks are free
    assert meta["remote_task_id"] == meta["task_arn"]
    assert answer.energy == pytest.approx(solve(problem, "exhaustive").energy, abs=1e-9)


def test_device_that_refuses_circuits_is_retried_with_backoff_then_falls_back():
    solver = BraketQAOASolver(LocalSimulator("braket_ahs"), name="braket-analog")
    waited: list[float] = []
    solver.sleep = waited.append
    answer = solve(dense(5, 2, 3), solver, seed=1, retries=2, backoff=0.25)
    assert answer.solver == "sa" and answer.metadata["remote"] is False
    assert answer.metadata["attempts"] == 3 and "does not support" in answer.metadata["errors"][0]
    assert sum(waited) == pytest.approx(0.25 + 0.5)  # backoff doubles


def test_cost_budget_of_zero_and_bad_arn():
    solver = get_solver("braket-qaoa")
    answer = solve(dense(4, 2, 0), solver, max_cost=0.0)
    assert answer.metadata["remote"] is False and "max_cost=0" in answer.metadata["fallback_reason"]
    with pytest.raises(UsageError, match="device_arn"):
        solve(dense(4, 2, 0), solver, device_arn="sv1")


def test_missing_sdk_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from qsurgeon.client.errors import SolverUnavailableError
    from qsurgeon.worker.solvers import registry

    for module in [name for name in sys.modules if name == "braket" or name.startswith("braket.")
                   or name == "qsurgeon.worker.solvers.cloud.braket"]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "braket", None)  # as if amazon-braket-sdk were not installed
    monkeypatch.delitem(registry._instances, "braket-qaoa", raising=False)
    with pytest.raises(SolverUnavailableError) as error:
        registry.get_solver("braket-qaoa")
    message = str(error.value)
    assert "\n" not in message and "[braket] extra" in message and "pip install 'qsurgeon[braket]'" in message
    assert not registry.capabilities("braket-qaoa").installed
