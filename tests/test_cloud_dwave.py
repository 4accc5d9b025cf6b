"""D-Wave backends on what dwave-system ships for local testing: the QPU path on
``MockDWaveSampler`` behind our clique embedding, the hybrid path on dimod's exact CQM
solver behind the same interface as Leap's. No network, no token."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("dwave.system")

import dimod  # noqa: E402
from dwave.system.testing import MockDWaveSampler  # noqa: E402

from blocks_for_backends import layerwise_like  # noqa: E402
from qsurgeon.client.errors import ProblemTooLargeError, UsageError  # noqa: E402
from qsurgeon.worker import BlockProblem, solve  # noqa: E402
from qsurgeon.worker.solve import solve_batch  # noqa: E402
from qsurgeon.worker.solvers.cloud.dwave import DWaveHybridSolver, DWaveQPUSolver  # noqa: E402
from qsurgeon.worker.solvers.registry import capabilities, get_solver, solver_parameters  # noqa: E402


def dense(size: int, k: int, seed: int, block_id: str = "b") -> BlockProblem:
    A = np.random.default_rng(seed).normal(size=(size, size))
    return BlockProblem.dense(A + A.T, k=k, id=block_id)


@pytest.fixture
def qpu() -> DWaveQPUSolver:
    return DWaveQPUSolver(MockDWaveSampler(), name="dwave-qpu-mock")


def test_registered_without_contacting_leap():
    solver = get_solver("dwave-qpu")  # built lazily: no DWaveSampler yet, so no token needed
    assert solver._child is None
    caps = capabilities("dwave-qpu")
    assert caps.installed and caps.remote and caps.constraints == "penalty" and caps.extra == "dwave"
    assert "qpu_access_time" in caps.cost_model
    hybrid = capabilities("dwave-hybrid")
    assert hybrid.constraints == "native" and hybrid.remote
    names = {param.name for param in solver_parameters("dwave-qpu")}
    assert {"num_reads", "chain_strength", "max_remote_blocks", "qpu_seconds", "max_cost", "fallback",
            "retries", "backoff", "timeout"} <= names


def test_qpu_on_the_mock_returns_a_feasible_repaired_answer_with_timing(qpu):
    problem = layerwise_like(12, seed=3)
    answer = solve(problem, qpu, seed=1)
    assert problem.is_feasible(answer.x)
    meta = answer.metadata
    assert meta["remote"] and meta["backend"] == "dwave-qpu" and meta["sampler"] == "MockDWaveSampler"
    assert meta["remote_task_id"] == meta["problem_id"]
    assert meta["qpu_access_time_us"] > 0 and meta["qpu_programming_time_us"] > 0 and meta["qpu_sampling_time_us"] > 0
    assert meta["qpu_seconds"] == pytest.approx(meta["qpu_access_time_us"] / 1e6)
    assert 0.0 <= meta["chain_break_fraction"] <= 1.0 and meta["max_chain_length"] >= 2
    assert meta["reads"] == 100 and meta["chain_strength"] > 0
    assert {"raw_feasible_rate", "repair_flips", "feasible_before_repair", "wall_seconds"} <= set(meta)
    assert meta["cost_estimate_usd"] is None  # no price given: the cost is not guessed
    priced = solve(problem, qpu, seed=1, price_per_second=2.0, num_reads=10)
    assert priced.metadata["cost_estimate_usd"] == pytest.approx(2.0 * priced.metadata["qpu_seconds"])
    assert priced.metadata["reads"] == 10
    # the mock anneals well on 12 variables: the repaired answer is close to the optimum
    best = solve(problem, "exhaustive").energy
    assert answer.energy <= best + 0.1 * abs(best)


def test_block_larger_than_the_clique_is_refused(qpu):
    assert qpu.largest_clique() == 16  # the mock's 4x4 Chimera
    with pytest.raises(ProblemTooLargeError, match="clique"):
        solve(dense(17, 8, 0), qpu)


def test_explicit_chain_strength_is_used(qpu):
    answer = solve(dense(8, 4, 2), qpu, chain_strength=3.5, num_reads=20)
    assert answer.metadata["chain_strength"] == 3.5


def test_hybrid_on_the_exact_cqm_solver_is_optimal_with_native_constraints():
    hybrid = DWaveHybridSolver(dimod.ExactCQMSolver(), name="dwave-hybrid-exact")
    for problem in (dense(10, 4, 5), layerwise_like(12, seed=7, groups_of=4)):  # cardinality, then 2:4 groups
        answer = solve(problem, hybrid)
        assert answer.energy == pytest.approx(solve(problem, "exhaustive").energy, abs=1e-9)
        meta = answer.metadata
        assert meta["constraints"] == "native" and meta["feasible_before_repair"] and meta["repair_flips"] == 0
        assert "penalty" not in meta and meta["remote"] and meta["sampler"] == "ExactCQMSolver"
        assert meta["solver_feasible_rate"] == pytest.approx(meta["raw_feasible_rate"])


def test_budget_of_blocks_sends_the_rest_to_the_fallback(qpu):
    problems = [dense(8, 4, seed, f"b{seed}") for seed in range(3)]
    answers = solve_batch(problems, qpu, seed=2, max_remote_blocks=1, num_reads=20)
    remote = [answer.metadata["remote"] for answer in answers]
    assert remote == [True, False, False]
    for answer in answers[1:]:
        assert answer.solver == "sa" and answer.metadata["fallback"] == "sa"
        assert answer.metadata["requested_solver"] == "dwave-qpu-mock"
        assert "max_remote_blocks=1" in answer.metadata["fallback_reason"]
    # the ledger is the solver's across calls (one process, one job): nothing is left
    later = solve(problems[0], qpu, seed=2, max_remote_blocks=1)
    assert later.metadata["remote"] is False
    qpu.ledger.reset()


def test_qpu_seconds_budget_of_zero_never_calls_the_qpu(qpu):
    answer = solve(dense(8, 4, 1), qpu, qpu_seconds=0.0, fallback="exhaustive")
    assert answer.solver == "exhaustive" and "qpu_seconds=0" in answer.metadata["fallback_reason"]
    assert answer.metadata["budget_spent"]["remote_blocks"] == 0


def test_qpu_seconds_budget_stops_after_it_is_spent(qpu):
    problems = [dense(8, 4, seed, f"q{seed}") for seed in range(3)]
    first = solve(problems[0], qpu, qpu_seconds=0.001, num_reads=10)  # one mock call reports ~8.5 ms
    assert first.metadata["remote"] and first.metadata["qpu_seconds"] > 0.001
    rest = solve_batch(problems[1:], qpu, qpu_seconds=0.001)
    assert [answer.metadata["remote"] for answer in rest] == [False, False]


def test_a_failing_sampler_is_retried_then_falls_back(caplog):
    # The mock refuses a structured problem that uses couplers it lacks: embed against the
    # full Chimera, sample on a mock whose couplers are gone (bad input for the QPU).
    full = MockDWaveSampler()
    broken = MockDWaveSampler(nodelist=full.nodelist, edgelist=full.edgelist[:10])
    solver = DWaveQPUSolver(full, name="dwave-qpu-broken")
    solver.largest_clique()
    solver._child = broken
    solver.sleep = lambda seconds: None
    with caplog.at_level(logging.WARNING):
        answer = solve(dense(8, 4, 3), solver, seed=4, retries=2, backoff=0.5)
    assert answer.solver == "sa" and answer.metadata["remote"] is False
    assert answer.metadata["attempts"] == 3 and len(answer.metadata["errors"]) == 3
    assert "remote failed" in answer.metadata["fallback_reason"]


def test_bad_parameters_are_usage_errors(qpu):
    with pytest.raises(UsageError, match="fallback 'nope'"):
        solve(dense(6, 3, 0), qpu, fallback="nope")
    with pytest.raises(UsageError, match="num_reads"):
        solve(dense(6, 3, 0), qpu, num_reads=0)
    with pytest.raises(UsageError, match="unknown parameter"):
        solve(dense(6, 3, 0), qpu, sweeps=10)
