"""The greedy construction + swap descent (the start of every solver run from scratch) and ``auto``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from block_instances import enumerated_minimum, factored_block, pruning_block

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers import auto
from qsurgeon.worker.solvers.greedy import descend, greedy_start, swap_deltas


def _all_swap_deltas(problem: BlockProblem, x: np.ndarray) -> np.ndarray:
    """ΔE of every allowed swap at x, by recomputing both energies (independent of the kernels)."""
    deltas, base = [], problem.energy(x)
    for members in problem.group_members():
        for j, i in itertools.product(members[x[members] == 1], members[x[members] == 0]):
            y = x.copy()
            y[i], y[j] = 1, 0
            deltas.append(problem.energy(y) - base)
    return np.array(deltas)


CASES = [pruning_block(20, 1, k=8), pruning_block(24, 2, groups=np.arange(24) // 4, counts=[2, 1, 3, 2, 2, 0]),
         factored_block(18, 3, 3, k=9), factored_block(16, 12, 4, groups=np.arange(16) // 8, counts=[3, 5])]


@pytest.mark.parametrize("problem", CASES)
def test_greedy_start_is_a_swap_local_optimum_with_exact_counts(problem):
    x = greedy_start(problem)
    assert x.dtype == np.uint8 and np.array_equal(problem.group_sums(x), problem.counts)
    scale = max(abs(problem.energy(x)), 1e-12)
    assert _all_swap_deltas(problem, x).min(initial=0.0) >= -1e-9 * scale
    assert np.array_equal(greedy_start(problem), x)  # deterministic


def test_descent_from_any_state_ends_no_worse_at_a_local_optimum():
    problem = pruning_block(30, 5, k=11, with_x0=True)
    x = descend(problem, problem.x0)
    assert problem.energy(x) <= problem.energy(problem.x0) and problem.is_feasible(x)
    assert _all_swap_deltas(problem, x).min() >= -1e-9 * abs(problem.energy(x))


def test_greedy_start_is_optimal_or_near_on_small_blocks():
    optimal, gaps = 0, []
    for seed in range(60):
        problem = pruning_block(14, seed)
        exact = enumerated_minimum(problem)
        energy = problem.energy(greedy_start(problem))
        assert energy >= exact - 1e-12
        optimal += energy <= exact + 1e-9 * abs(exact) + 1e-15
        gaps.append(energy - exact)
    assert optimal >= 0.6 * 60  # measured: 151 of 200 at B = 16


@pytest.mark.parametrize("solver", ["sa", "swap-tabu"])
def test_from_scratch_solvers_start_greedy_and_never_end_worse(solver):
    problems = CASES + [pruning_block(64, 7, k=30), factored_block(40, 4, 8, k=20)]
    answers = solve_batch(problems, solver, seed=2, sweeps=50)
    for problem, answer in zip(problems, answers):
        assert answer.metadata["start"] == "greedy"
        assert answer.energy <= problem.energy(greedy_start(problem)) + 1e-12
    random_start = solve(problems[0], solver, seed=2, sweeps=50, start="random")
    assert random_start.metadata["start"] == "random"


def test_swap_deltas_match_recomputed_energies():
    for problem in (CASES[0], CASES[2]):
        x = greedy_start(problem)
        sample = swap_deltas(problem, x, samples=64, seed=1)
        every = _all_swap_deltas(problem, x)
        assert all(np.isclose(every, value, rtol=1e-6, atol=1e-12).any() for value in sample)


def test_x0_starts_are_unchanged_by_the_scale_option():
    problem = pruning_block(48, 3, k=20, with_x0=True)
    default = solve(problem, "sa", seed=4, sweeps=40)
    assert default.metadata["start"] == "x0"
    assert default.metadata["energy_scale"] != solve(problem, "sa", seed=4, sweeps=40,
                                                     scale_quantile=0.1).metadata["energy_scale"]


def test_auto_routes_by_size_and_groups_and_checks_its_answers():
    small = pruning_block(12, 1, k=5)
    nm = pruning_block(64, 2, groups=np.arange(64) // 8, counts=[4] * 8)
    single = pruning_block(96, 3, k=40, with_x0=True)
    answers = solve_batch([small, nm, single], "auto", seed=0, effort="short")
    assert [a.metadata["auto"]["solver"] for a in answers] == ["exhaustive", "sa", "swap-tabu"]
    assert answers[0].energy == pytest.approx(enumerated_minimum(small), rel=1e-9)
    assert answers[2].energy <= single.energy(single.x0)
    assert all(a.solver == "auto" for a in answers)
    alone = solve(single, "auto", seed=0, effort="short")
    assert np.array_equal(alone.x, answers[2].x)  # a block's answer does not depend on its batch
    assert auto.choose(factored_block(5000, 2, 1, k=10))[0] == "sa"  # beyond swap-tabu's limit


def test_auto_gives_rows_with_outlier_channels_drop_add_moves():
    """A large group with heavy columns (a few channels' rows and columns of Q scaled 12×) between
    DROP_ADD_MIN_VARIABLES and DROP_ADD_MAX_VARIABLES: drop-add moves, unless the run is iCBS-short."""
    size = 192
    rng = np.random.default_rng(5)
    X, w = rng.standard_normal((size, 3 * size)), rng.uniform(0.5, 1.0, size) * 0.05  # no heavy tails
    plain = BlockProblem.dense((w[:, None] * (X @ X.T / X.shape[1]) * w[None, :]).astype(np.float32), k=96)
    scale = np.ones(size)
    scale[[7, 40, 41, 150]] = 12.0
    outliers = BlockProblem.dense((scale[:, None] * plain.dense_Q() * scale[None, :]).astype(np.float32), k=96)
    assert auto.choose(outliers)[1]["move"] == "drop-add"
    assert auto.choose(outliers, "long")[1]["iterations"] > auto.choose(outliers)[1]["iterations"]
    assert "move" not in auto.choose(outliers, "short")[1] and "move" not in auto.choose(plain)[1]
    small = BlockProblem.dense(outliers.dense_Q()[:128, :128].astype(np.float32), k=64)
    assert "move" not in auto.choose(small)[1]  # B = 128: the best swap is as good and faster
    answer = solve(outliers, "auto", seed=1, sweeps=3000)
    assert answer.metadata["move"] == "drop-add" and answer.metadata["auto"]["move"] == "drop-add"
    assert (answer.metadata["tenure"], answer.metadata["stall"], answer.metadata["kick"]) == (3, 400, size // 32)
    assert answer.energy <= solve(outliers, "swap-tabu", iterations=0).energy  # never above its greedy start


def test_auto_takes_restarts_and_sweeps_in_the_chosen_solvers_terms():
    nm = pruning_block(64, 2, groups=np.arange(64) // 8, counts=[4] * 8)
    single = pruning_block(96, 3, k=40, with_x0=True)
    small = pruning_block(12, 1, k=5)
    answers = solve_batch([nm, single, small], "auto", seed=0, effort="short", restarts=3, sweeps=7)
    assert answers[0].metadata["auto"] == {"solver": "sa", "effort": "short", "restarts": 3, "sweeps": 7}
    assert answers[0].sweeps == 7 and answers[0].restarts == 3
    assert answers[1].metadata["auto"] == {"solver": "swap-tabu", "effort": "short", "restarts": 3, "iterations": 7}
    assert answers[2].metadata["auto"]["solver"] == "exhaustive"
    same = solve(single, "swap-tabu", seed=0, start="auto", restarts=3, iterations=7)
    assert np.array_equal(same.x, answers[1].x)


def test_auto_is_the_default_of_prune_solve_and_the_service():
    from qsurgeon.client.options import PruneOptions
    from qsurgeon.client.schemas import SolveRequest

    assert PruneOptions.model_fields["solver"].default == "auto"
    assert SolveRequest.model_fields["solver"].default == "auto"


def test_cli_solve_defaults_to_auto_and_passes_sweeps(tmp_path, capsys):
    import json

    from qsurgeon.client.cli import main

    path = tmp_path / "a.npz"
    problem = pruning_block(40, 1, k=17)
    problem.save_npz(path)
    assert main(["solve", str(path), "--json", "--seed", "4", "--sweeps", "20"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["solver"] == "auto" and record["metadata"]["auto"]["iterations"] == 20
