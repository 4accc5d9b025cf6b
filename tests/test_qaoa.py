"""QAOA backend: the QuadraticProgram and Ising forms checked by brute force, one real run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from blocks_for_backends import fisher_like, layerwise_like
from qsurgeon.client.errors import ProblemTooLargeError, UsageError
from qsurgeon.worker import solve
from qsurgeon.worker.solvers.penalty import PenaltyModel, greedy_repair

pytest.importorskip("qiskit_optimization", reason="QAOA needs the [quantum] extra")

from qsurgeon.worker.solvers.qaoa import MAX_QAOA_QUBITS, QAOASolver, bits_of, block_program  # noqa: E402


def all_assignments(num_variables: int) -> np.ndarray:
    return np.array(list(itertools.product((0, 1), repeat=num_variables)), dtype=np.uint8)


@pytest.mark.parametrize("make", [lambda: layerwise_like(6, 1, groups_of=3), lambda: fisher_like(7, 2)])
def test_quadratic_program_is_the_block(make):
    problem = make()
    model = PenaltyModel.build(problem, 1.0)
    program = block_program(problem, model)
    assert program.get_num_linear_constraints() == problem.num_groups
    for x in all_assignments(problem.num_variables):
        value = program.objective.evaluate(x.astype(float)) * model.scale + problem.offset
        assert value == pytest.approx(problem.energy(x), rel=1e-9, abs=1e-12)
        assert program.is_feasible(x.astype(float)) == problem.is_feasible(x)


def test_ising_operator_maps_bit_i_to_variable_i():
    """The operator's diagonal at basis state z is P(x)/scale with x_i = bit i of z."""
    from qiskit_optimization.converters import QuadraticProgramToQubo

    problem = fisher_like(6, 5, groups_of=3)
    model = PenaltyModel.build(problem, 2.0)
    qubo = QuadraticProgramToQubo(penalty=model.strength / model.scale).convert(block_program(problem, model))
    operator, offset = qubo.to_ising()
    diagonal = np.real(operator.to_matrix(sparse=True).diagonal()) + offset
    X = bits_of(np.arange(2**6), 6)
    deviations = np.stack([problem.group_sums(x) for x in X]) - problem.counts
    penalised = problem.energies(X) - problem.offset + model.strength * (deviations**2).sum(axis=1)
    np.testing.assert_allclose(diagonal * model.scale, penalised, rtol=1e-7, atol=1e-10)


def test_qaoa_end_to_end_on_an_eight_variable_block():
    problem = layerwise_like(8, 4, groups_of=4)
    solution = solve(problem, "qaoa", seed=7, maxiter=15, shots=256)
    assert problem.is_feasible(solution.x)
    assert solution.energy == problem.energy(solution.x)
    assert "reported_energy" not in solution.metadata
    feasible = [x for x in all_assignments(8) if problem.is_feasible(x)]
    energies = problem.energies(np.array(feasible))
    best, worst = energies.min(), energies.max()
    ratio = (worst - solution.energy) / (worst - best)  # 1 = optimum, 0 = worst feasible
    meta = solution.metadata
    # the honest baseline: as many uniformly random bitstrings, repaired the same way
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2, size=(256, 8)).astype(np.uint8)
    Q = problem.dense_Q()
    random_best = min(problem.energy(greedy_repair(problem, Q, x)[0]) for x in random_bits)
    print(
        f"\nQAOA B=8: energy {solution.energy:.6g}, optimum {best:.6g}, approximation ratio {ratio:.3f}; "
        f"raw feasibility {meta['raw_feasible_rate']:.2f}, P(returned) {meta['returned_probability']:.3f}, "
        f"{meta['cost_function_evals']} evaluations; 256 random repaired bitstrings reach {random_best:.6g}"
    )
    assert 0.0 <= ratio <= 1.0
    assert meta["qubits"] == 8 and meta["cost_function_evals"] <= 16 and meta["reads"] == 256
    assert 0.0 < meta["raw_feasible_rate"] <= 1.0
    assert np.isfinite(meta["expected_penalised_energy"])
    assert meta["expected_penalised_energy"] >= best - 1e-12  # an expectation cannot beat the optimum


def test_user_supplied_sampler():
    from qiskit.primitives import StatevectorSampler

    problem = fisher_like(4, 3)
    solver = QAOASolver(sampler=StatevectorSampler(seed=1), name="qaoa-statevector", maxiter=5)
    solution = solve(problem, solver, seed=2)
    assert problem.is_feasible(solution.x)
    assert solution.solver == "qaoa-statevector"
    assert solution.metadata["sampler"] == "StatevectorSampler"
    assert solution.metadata["reads"] == 1024  # StatevectorSampler's default shots
    assert solver.capabilities.max_variables == MAX_QAOA_QUBITS


def test_blocks_above_the_qubit_limit_are_refused():
    problem = layerwise_like(MAX_QAOA_QUBITS + 1, 0, with_x0=False)
    with pytest.raises(ProblemTooLargeError, match=f"at most {MAX_QAOA_QUBITS}"):
        solve(problem, "qaoa")
    with pytest.raises(ProblemTooLargeError, match="one qubit per variable"):
        QAOASolver().sample(problem)


@pytest.mark.parametrize(
    "params, message",
    [({"reps": 0}, "reps"), ({"optimizer": "adam"}, "optimizer"), ({"sweeps": 10}, "sweeps"), ({"shots": 1.5}, "shots")],
)
def test_bad_parameters(params, message):
    with pytest.raises(UsageError, match=message):
        solve(layerwise_like(4, 0), "qaoa", **params)


def test_same_seed_same_answer():
    problem = layerwise_like(6, 8)
    first = solve(problem, "qaoa", seed=3, maxiter=5, shots=64)
    second = solve(problem, "qaoa", seed=3, maxiter=5, shots=64)
    assert np.array_equal(first.x, second.x)
    assert first.metadata["expected_penalised_energy"] == second.metadata["expected_penalised_energy"]
