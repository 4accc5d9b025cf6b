"""The group-exact move for N:M blocks (solvers/group_descent.py) and its use by sa, swap-tabu, greedy and auto."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from block_instances import factored_block, pruning_block

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers import auto, group_descent
from qsurgeon.worker.solvers.greedy import descend, greedy_start


def _nm_block(size: int, group: int, ones: int, seed: int, factored: bool = False) -> BlockProblem:
    groups = np.arange(size) // group
    counts = [ones] * (size // group)
    if factored:
        return factored_block(size, 5, seed, groups=groups, counts=counts)
    return pruning_block(size, seed, groups=groups, counts=counts)


def _random_state(problem: BlockProblem, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros(problem.num_variables, np.uint8)
    for members, count in zip(problem.group_members(), problem.counts):
        x[rng.choice(members, size=int(count), replace=False)] = 1
    return x


def _best_group_move(problem: BlockProblem, x: np.ndarray) -> float:
    """The lowest energy any single group's re-configuration reaches from x, by itertools (no kernel)."""
    best = problem.energy(x)
    for members, count in zip(problem.group_members(), problem.counts):
        for chosen in itertools.combinations(members, int(count)):
            y = x.copy()
            y[members] = 0
            y[list(chosen)] = 1
            best = min(best, problem.energy(y))
    return best


CASES = [(16, 8, 4), (16, 4, 2), (12, 4, 2), (16, 8, 3)]


@pytest.mark.parametrize("size, group, ones", CASES)
@pytest.mark.parametrize("factored", [False, True])
def test_group_descent_ends_where_no_group_can_improve(size, group, ones, factored):
    for seed in range(3):
        problem = _nm_block(size, group, ones, seed, factored)
        start = _random_state(problem, seed)
        x = group_descent.group_descent(problem, start)
        assert np.array_equal(problem.group_sums(x), problem.counts)
        energy = problem.energy(x)
        assert energy <= problem.energy(start)
        assert _best_group_move(problem, x) >= energy - 1e-9 * abs(energy)
        assert np.array_equal(group_descent.group_descent(problem, start), x)  # deterministic


def test_dense_and_factored_forms_give_the_same_state():
    for seed in range(4):
        factored = _nm_block(16, 8, 4, seed, factored=True)
        dense = BlockProblem.dense(factored.dense_Q(), groups=factored.group_of, counts=factored.counts,
                                   offset=factored.offset)
        start = _random_state(factored, seed)
        assert np.array_equal(group_descent.group_descent(factored, start), group_descent.group_descent(dense, start))


def test_group_descent_goes_below_the_swap_descent_somewhere():
    """A 1-swap local optimum is not always a group optimum: over a few blocks the move must find more."""
    lower = 0
    for seed in range(12):
        problem = _nm_block(16, 8, 4, seed)
        x = descend(problem, _random_state(problem, seed))
        lower += problem.energy(group_descent.group_descent(problem, x)) < problem.energy(x) - 1e-12
    assert lower >= 1


def test_large_groups_are_left_alone():
    groups = np.r_[np.zeros(16, np.int64), 1 + np.arange(8) // 4]  # one group of 16 (C = 12870) and two 2:4
    problem = pruning_block(24, 4, groups=groups, counts=[8, 2, 2])
    assert group_descent.eligible_groups(problem).tolist() == [False, True, True]
    start = _random_state(problem, 1)
    x = group_descent.group_descent(problem, start)
    assert np.array_equal(x[:16], start[:16])
    single = pruning_block(40, 2, k=17)
    assert not group_descent.applies(single)
    assert np.array_equal(group_descent.group_descent(single, _random_state(single, 0)), _random_state(single, 0))


def test_polish_states_never_worse_row_by_row():
    problem = _nm_block(64, 8, 4, 5)
    states = np.stack([_random_state(problem, seed) for seed in range(4)])
    polished = group_descent.polish_states(problem, states)
    assert np.all(problem.energies(polished) <= problem.energies(states))
    assert np.all(problem.energies(polished) < problem.energies(states))  # random states are never group optima


def test_greedy_start_on_small_groups_is_a_group_optimum():
    problem = _nm_block(16, 8, 4, 3)
    x = greedy_start(problem)
    assert _best_group_move(problem, x) >= problem.energy(x) - 1e-9 * abs(problem.energy(x))
    assert problem.energy(x) <= problem.energy(greedy_start(problem, groups=False))


@pytest.mark.parametrize("solver", ["sa", "swap-tabu"])
def test_the_polish_never_makes_an_answer_worse_and_keeps_it_reproducible(solver):
    problems = [_nm_block(64, 8, 4, seed) for seed in range(3)] + [_nm_block(48, 4, 2, 3, factored=True)]
    run = {"seed": 3, "sweeps": 2, "restarts": 2, "start": "random"}  # short runs from random states: room to polish
    polished = solve_batch(problems, solver, polish="group", **run)
    plain = solve_batch(problems, solver, polish="none", **run)
    gains = []
    default = {"sa": "group", "swap-tabu": "none"}[solver]
    assert solve(problems[0], solver, seed=3, sweeps=2).metadata["polish"] == default
    for problem, with_polish, without in zip(problems, polished, plain):
        assert with_polish.energy <= without.energy
        assert with_polish.energy == pytest.approx(problem.energy(with_polish.x), rel=1e-12, abs=1e-15)
        assert np.array_equal(problem.group_sums(with_polish.x), problem.counts)
        assert with_polish.metadata["polish"] == "group" and without.metadata["polish_gain"] == 0.0
        gains.append(with_polish.metadata["polish_gain"])
    assert all(gain >= 0 for gain in gains) and any(gain > 0 for gain in gains)
    alone = solve(problems[1], solver, polish="group", **run)
    assert np.array_equal(alone.x, polished[1].x)  # the same answer alone or in a batch


def test_the_polish_lowers_short_runs_from_random_starts():
    problems = [_nm_block(64, 8, 4, seed) for seed in range(3)]
    polished = solve_batch(problems, "sa", seed=1, sweeps=1, restarts=1, start="random")
    plain = solve_batch(problems, "sa", seed=1, sweeps=1, restarts=1, start="random", polish="none")
    assert all(a.energy < b.energy for a, b in zip(polished, plain))


def test_group_anneal_is_feasible_deterministic_and_never_worse():
    problem = _nm_block(64, 8, 4, 6)
    start = greedy_start(problem)
    x = group_descent.group_anneal(problem, start, key=7, sweeps=50)
    assert np.array_equal(problem.group_sums(x), problem.counts)
    assert problem.energy(x) <= problem.energy(start)
    assert np.array_equal(group_descent.group_anneal(problem, start, key=7, sweeps=50), x)
    small = _nm_block(16, 8, 4, 6)
    y = group_descent.group_anneal(small, _random_state(small, 0), key=1, sweeps=5)
    assert _best_group_move(small, y) >= small.energy(y) - 1e-9 * abs(small.energy(y))  # it ends descended


def test_auto_routes_nm_blocks_by_size_and_effort():
    """N:M blocks: swap-tabu (tenure 4) up to TABU_GROUPS_MAX_VARIABLES, sa above; iCBS's short runs: sa."""
    name, budget = auto.choose(_nm_block(256, 8, 4, 0))
    assert name == "swap-tabu" and budget == auto.BUDGETS[("swap-tabu-groups", "default")]
    assert budget["tenure"] == 4 and (budget["restarts"], budget["iterations"]) == (4, 10000)
    name, budget = auto.choose(_nm_block(auto.TABU_GROUPS_MAX_VARIABLES + 8, 8, 4, 0))
    assert name == "sa" and budget == auto.BUDGETS[("sa-groups", "default")]
    assert budget["restarts"] == 8 and budget["sweeps"] == 4000
    assert auto.choose(_nm_block(256, 8, 4, 0), "short") == ("sa", auto.BUDGETS[("sa-groups", "short")])
    assert auto.choose(_nm_block(256, 8, 4, 0), "long")[1]["iterations"] == 40000
    problem = _nm_block(24, 8, 4, 3)  # 70³ feasible states: enumerated
    answer = solve(problem, "auto", seed=2)
    assert answer.metadata["auto"]["solver"] == "swap-tabu" and answer.metadata["tenure"] == 4
    assert np.array_equal(problem.group_sums(answer.x), problem.counts)
    patterns = np.array([[1 if v in ones else 0 for v in range(8)] for ones in itertools.combinations(range(8), 4)])
    X = np.array([np.concatenate(choice) for choice in itertools.product(patterns, repeat=3)], np.float64)
    exact = float(np.einsum("nb,nb->n", X @ problem.dense_Q(), X).min()) + problem.offset
    assert answer.energy == pytest.approx(exact, rel=1e-9)
