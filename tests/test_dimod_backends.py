"""dimod backends and the penalty machinery, checked against brute force."""

from __future__ import annotations

import itertools

import dimod
import numpy as np
import pytest

from blocks_for_backends import fisher_like, layerwise_like
from qsurgeon.client.errors import ProblemTooLargeError, SolverUnavailableError, UsageError
from qsurgeon.worker import BlockProblem, solve
from qsurgeon.worker.solvers.dimod_backends import (
    MAX_READS, DimodSamplerSolver, annealing_beta_range, penalised_bqm, samples_as_array,
)
from qsurgeon.worker.solvers.penalty import (
    PenaltyModel, flip_costs, greedy_feasible, greedy_repair, hard_strength, largest_flip_saving,
)
from qsurgeon.worker.solvers.registry import get_solver

INSTANCES = [
    lambda seed: layerwise_like(12, seed),
    lambda seed: layerwise_like(16, seed, groups_of=4),
    lambda seed: fisher_like(14, seed),
    lambda seed: fisher_like(16, seed, groups_of=8),
]


def all_assignments(num_variables: int) -> np.ndarray:
    return np.array(list(itertools.product((0, 1), repeat=num_variables)), dtype=np.uint8)


def optimum(problem: BlockProblem) -> float:
    return solve(problem, "exhaustive").energy


def hits(energy: float, best: float) -> bool:
    return energy <= best + 1e-9 * max(1.0, abs(best))


# ---------------------------------------------------------------------- penalty
@pytest.mark.parametrize("make", [lambda: layerwise_like(8, 3, groups_of=4), lambda: fisher_like(9, 4)])
@pytest.mark.parametrize("alpha", [0.5, "hard"])
def test_penalised_qubo_is_energy_plus_penalty_everywhere(make, alpha):
    problem = make()
    model = PenaltyModel.build(problem, alpha)
    matrix, offset = model.penalised_qubo()
    X = all_assignments(problem.num_variables)
    deviations = np.stack([problem.group_sums(x) for x in X]) - problem.counts
    expected = problem.energies(X) - problem.offset + model.strength * (deviations**2).sum(axis=1)
    got = (np.einsum("nb,bc,nc->n", X.astype(float), matrix, X.astype(float)) + offset) * model.scale
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    bqm = penalised_bqm(model)
    np.testing.assert_allclose(bqm.energies((X, range(problem.num_variables))) * model.scale, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_hard_penalty_ground_state_is_the_feasible_optimum(seed):
    problem = INSTANCES[seed](seed)
    model = PenaltyModel.build(problem, "hard")
    ground = dimod.ExactSolver().sample(penalised_bqm(model)).first.sample
    x = np.array([ground[i] for i in range(problem.num_variables)], dtype=np.uint8)
    assert problem.is_feasible(x)
    assert problem.energy(x) == pytest.approx(optimum(problem), rel=1e-9, abs=1e-12)


def test_hard_strength_bounds_every_single_flip():
    problem = fisher_like(10, 7)
    Q = problem.dense_Q()
    X = all_assignments(10).astype(float)
    largest_flip = max(np.abs(flip_costs(Q, x)).max() for x in X)
    assert largest_flip <= hard_strength(Q)


def test_lambda0_is_the_largest_single_flip_saving_at_the_greedy_solution():
    problem = layerwise_like(10, 11)
    Q = problem.dense_Q()
    x = greedy_feasible(problem, Q)
    assert problem.is_feasible(x)
    flipped = np.tile(x, (10, 1))
    flipped[np.arange(10), np.arange(10)] ^= 1
    saving = problem.energy(x) - problem.energies(flipped).min()
    assert largest_flip_saving(problem, Q) == pytest.approx(max(saving, 1e-3 * hard_strength(Q)), rel=1e-9)
    assert PenaltyModel.build(problem, 16).strength == pytest.approx(16 * largest_flip_saving(problem, Q))


def test_repair_of_one_extra_one_removes_the_cheapest():
    problem = layerwise_like(10, 5)
    x = problem.x0.copy()
    x[np.nonzero(x == 0)[0][0]] = 1  # one too many
    repaired, flips = greedy_repair(problem, problem.dense_Q(), x)
    candidates = []
    for index in np.nonzero(x)[0]:
        option = x.copy()
        option[index] = 0
        candidates.append(problem.energy(option))
    assert flips == 1 and problem.is_feasible(repaired)
    assert problem.energy(repaired) == pytest.approx(min(candidates), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_repair_fixes_only_wrong_groups_with_the_minimum_number_of_flips(seed):
    problem = fisher_like(16, seed, groups_of=4)
    x = np.random.default_rng(seed).integers(0, 2, 16).astype(np.uint8)
    deviation = problem.group_sums(x) - problem.counts
    repaired, flips = greedy_repair(problem, problem.dense_Q(), x)
    assert problem.is_feasible(repaired)
    assert flips == int(np.abs(deviation).sum())
    right_groups = np.isin(problem.group_of, np.nonzero(deviation == 0)[0])
    assert np.array_equal(repaired[right_groups], x[right_groups])


def test_bad_alpha_is_a_usage_error():
    problem = layerwise_like(8, 0)
    for alpha in (0, -1, "soft", float("nan"), True):
        with pytest.raises(UsageError, match="alpha"):
            solve(problem, "neal", alpha=alpha)


# ---------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", ["neal", "tabu", "steepest", "exact-dimod"])
@pytest.mark.parametrize("index", range(len(INSTANCES)))
def test_backend_answers_are_feasible_with_true_energies(name, index):
    problem = INSTANCES[index](100 + index)
    solution = solve(problem, name, seed=3)
    assert problem.is_feasible(solution.x)
    assert solution.energy == problem.energy(solution.x)
    assert "reported_energy" not in solution.metadata  # the backend's own energy was already exact
    meta = solution.metadata
    assert 0.0 <= meta["raw_feasible_rate"] <= 1.0
    assert meta["penalty"] > 0 and meta["reads"] >= 1
    assert solution.energy >= optimum(problem) - 1e-12


@pytest.mark.slow
def test_optimum_rates_on_small_blocks():
    """On 12–16-variable blocks: how often each backend lands on the exhaustive optimum."""
    names = ["exact-dimod", "tabu", "neal", "steepest"]
    try:
        get_solver("sa")
        names.append("sa")
    except SolverUnavailableError:
        pass
    seeds = range(4)
    found = {name: 0 for name in names}
    feasible_rates = {name: [] for name in names}
    total = 0
    for seed in seeds:
        for make in INSTANCES:
            problem = make(200 + seed)
            best = optimum(problem)
            total += 1
            for name in names:
                solution = solve(problem, name, seed=seed)
                found[name] += hits(solution.energy, best)
                feasible_rates[name].append(solution.metadata.get("raw_feasible_rate", 1.0))
    rates = {name: found[name] / total for name in names}
    print("\nrate of reaching the exhaustive optimum on", total, "blocks (B = 12..16):")
    for name in names:
        print(f"  {name:<12} {rates[name]:.2f}   mean raw feasibility {np.mean(feasible_rates[name]):.2f}")
    assert rates["exact-dimod"] == 1.0
    assert rates["tabu"] >= 0.9
    assert rates["neal"] >= 0.9
    assert rates["steepest"] >= 0.5
    if "sa" in rates:
        assert rates["sa"] >= 0.8


def test_neal_is_reproducible_with_a_seed():
    problem = layerwise_like(16, 9)
    first, second = solve(problem, "neal", seed=5), solve(problem, "neal", seed=5)
    assert np.array_equal(first.x, second.x)
    assert first.metadata["raw_feasible_rate"] == second.metadata["raw_feasible_rate"]


def test_generic_parameters_reach_the_sampler():
    problem = layerwise_like(12, 2)
    solution = solve(problem, "neal", seed=1, restarts=3, sweeps=50)
    assert solution.restarts == 3 and solution.sweeps == 50
    assert solution.metadata["sampler_params"]["num_reads"] == 3
    tabu = solve(problem, "tabu", seed=1, restarts=2, time_limit=0.1)
    assert tabu.metadata["sampler_params"]["timeout"] == 50


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("neal", {"time_limit": 1.0}, r"unknown parameter\(s\) time_limit; it takes: alpha, .*restarts, .*sweeps"),
        ("neal", {"restarts": 0}, "restarts"),
        ("neal", {"restarts": MAX_READS + 1}, "restarts"),
        ("neal", {"sweeps": 2.5}, "sweeps"),
        ("tabu", {"sweeps": 10}, r"unknown parameter\(s\) sweeps; it takes: .*time_limit"),
        ("tabu", {"time_limit": -1}, "time_limit"),
        ("exact-dimod", {"restarts": 2}, r"unknown parameter\(s\) restarts; it takes: alpha, seed$"),
        ("steepest", {"seed": -4}, "seed"),
    ],
)
def test_bad_parameters_are_usage_errors(name, params, message):
    with pytest.raises(UsageError, match=message):
        solve(layerwise_like(8, 0), name, **params)


def test_size_limits_are_enforced():
    with pytest.raises(ProblemTooLargeError, match="at most 20"):
        solve(layerwise_like(22, 0, with_x0=False), "exact-dimod")
    wide = BlockProblem.factored(np.ones((1, 2049), np.float32), k=3)
    with pytest.raises(ProblemTooLargeError, match="at most 2048"):
        solve(wide, "neal")


# ---------------------------------------------------------------------- generic adapter
class ReversedSpinSampler(dimod.Sampler):
    """A user's own sampler: answers in SPIN form with the variables in reverse order."""

    parameters: dict = {}
    properties: dict = {}

    def sample(self, bqm, **kwargs):
        spin = bqm.change_vartype(dimod.SPIN, inplace=False)
        exact = dimod.ExactSolver().sample(spin).lowest(atol=1e-12)
        order = sorted(spin.variables, reverse=True)
        samples = [[row[v] for v in order] for row in exact.samples()]
        return dimod.SampleSet.from_samples((samples, order), dimod.SPIN, energy=exact.record.energy)


def test_any_dimod_sampler_can_be_a_backend():
    problem = fisher_like(12, 21, groups_of=4)
    solver = DimodSamplerSolver(ReversedSpinSampler(), "reversed-spin", alpha="hard")
    solution = solve(problem, solver, seed=0)  # seed dropped: the sampler has none
    assert solution.solver == "reversed-spin"
    assert solution.energy == pytest.approx(optimum(problem), rel=1e-9)
    assert solution.metadata["raw_feasible_rate"] == 1.0


def test_random_sampler_adapter_repairs_everything():
    problem = layerwise_like(14, 8)
    solution = solve(problem, DimodSamplerSolver(dimod.RandomSampler(), "random"), restarts=40)
    assert problem.is_feasible(solution.x)
    assert solution.metadata["reads"] == 40
    assert solution.metadata["raw_feasible_rate"] < 0.5  # random bits rarely have exact counts


def test_samples_are_reordered_by_label():
    sampleset = dimod.SampleSet.from_samples(([[1, 0, 0], [0, 1, 1]], [2, 0, 1]), dimod.BINARY, energy=[0, 0])
    samples, occurrences = samples_as_array(sampleset, 3)
    assert samples.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert occurrences.tolist() == [1, 1]


def test_not_a_sampler_is_refused():
    with pytest.raises(UsageError, match="not a dimod sampler"):
        DimodSamplerSolver(object())


def test_beta_range_is_ordered_and_quick_at_large_b():
    import time

    model = PenaltyModel.build(layerwise_like(512, 0, with_x0=False), 0.5)
    bqm = penalised_bqm(model)
    started = time.perf_counter()
    hot, cold = annealing_beta_range(bqm)
    assert 0 < hot < cold
    assert time.perf_counter() - started < 5.0  # D-Wave's helper loops over 130k couplers in Python
