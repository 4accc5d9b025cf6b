"""IBM Quantum backend in qiskit-ibm-runtime's local testing mode: a fake backend
(FakeManilaV2, 5 qubits, its noise model) run on Aer through SamplerV2 inside a Batch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qiskit_ibm_runtime")

from qiskit.quantum_info import Statevector  # noqa: E402
from qiskit_ibm_runtime.fake_provider import FakeManilaV2  # noqa: E402

from qsurgeon.client.errors import ProblemTooLargeError  # noqa: E402
from qsurgeon.worker import BlockProblem, solve  # noqa: E402
from qsurgeon.worker.solve import solve_batch  # noqa: E402
from qsurgeon.worker.solvers.cloud.ibm import IBMQAOASolver, qaoa_circuit  # noqa: E402
from qsurgeon.worker.solvers.cloud.qaoa_plan import basis_costs, plan, qaoa_state  # noqa: E402
from qsurgeon.worker.solvers.registry import capabilities  # noqa: E402


def dense(size: int, k: int, seed: int, block_id: str = "b") -> BlockProblem:
    A = np.random.default_rng(seed).normal(size=(size, size))
    return BlockProblem.dense(A + A.T, k=k, id=block_id)


@pytest.fixture(scope="module")
def manila() -> IBMQAOASolver:
    return IBMQAOASolver(FakeManilaV2(), name="ibm-qaoa-manila", maxiter=30)


def test_circuit_prepares_the_state_the_angles_were_chosen_for():
    problem = dense(4, 2, 0)
    block = plan(problem, 1.0, reps=2, maxiter=20, seed=3)
    circuit = qaoa_circuit(block)
    circuit.remove_final_measurements()
    matrix, offset = block.model.penalised_qubo()
    expected = qaoa_state(basis_costs(matrix, offset), block.gammas, block.betas, 4)
    assert abs(np.vdot(Statevector(circuit).data, expected)) == pytest.approx(1.0, abs=1e-9)


def test_round_goes_out_in_one_batch_and_answers_are_feasible(manila):
    problems = [dense(4, 2, 1, "a"), dense(5, 2, 2, "b")]
    answers = solve_batch(problems, manila, seed=5, shots=512)
    for problem, answer in zip(problems, answers):
        assert problem.is_feasible(answer.x) and answer.metadata["remote"]
        meta = answer.metadata
        assert meta["backend_name"] == "fake_manila" and meta["shots"] == 512 and meta["reads"] == 512
        assert meta["remote_task_id"] == meta["job_id"] and meta["session_id"]
        assert meta["usage_seconds"] == 0  # local testing mode bills nothing
        assert meta["transpiled_depth"] > 0 and meta["two_qubit_gates"] > 0
        assert {"raw_feasible_rate", "repair_flips", "feasible_before_repair", "wall_seconds",
                "expected_penalised_energy", "gammas", "betas"} <= set(meta)
        # noisy hardware model, but at B ≤ 5 512 shots see the optimum
        assert answer.energy == pytest.approx(solve(problem, "exhaustive").energy, abs=1e-9)


def test_more_variables_than_qubits_is_refused(manila):
    with pytest.raises(ProblemTooLargeError, match="at most 5"):
        solve(dense(6, 3, 0), manila)


def test_time_out_is_retried_then_falls_back(manila):
    answer = solve(dense(4, 2, 4), manila, seed=1, timeout=1e-6, retries=1, backoff=0.0, poll_interval=0.01)
    assert answer.metadata["remote"] is False and answer.solver == "sa"
    assert answer.metadata["attempts"] == 2 and all("timed out" in error for error in answer.metadata["errors"])


def test_registered_default_reads_the_account_only_when_used():
    caps = capabilities("ibm-qaoa")
    assert caps.installed and caps.remote and caps.extra == "ibm" and caps.max_variables == 20
