"""The ``swap-tabu`` solver: optimality on small blocks, exact counts, reproducibility, forms, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from block_instances import direct_energy, enumerated_minimum, factored_block, pruning_block

from qsurgeon.client.cli import main
from qsurgeon.client.errors import ProblemTooLargeError, UsageError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers import swap_tabu, swap_tabu_cpu
from qsurgeon.worker.solvers.registry import capabilities, solver_names

SOLVER = "swap-tabu"


# ---------------------------------------------------------------------- answers
def test_energies_equal_an_independent_computation():
    problems = [pruning_block(24, 1, k=10), factored_block(20, 3, 2, k=7),
                pruning_block(16, 3, groups=np.arange(16) // 4, counts=[2, 2, 2, 2])]
    for problem, answer in zip(problems, solve_batch(problems, SOLVER, seed=0, iterations=50)):
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9, abs=1e-12)
        assert "reported_energy" not in answer.metadata
        assert answer.solver == SOLVER and answer.restarts == 2 and answer.sweeps == 50


def test_finds_the_exhaustive_optimum_on_small_pruning_blocks():
    problems = [pruning_block(16, seed) for seed in range(200)]
    answers = solve_batch(problems, SOLVER, seed=7, iterations=100)
    optimal = 0
    for problem, answer in zip(problems, answers):
        exact = enumerated_minimum(problem)
        assert answer.energy >= exact - 1e-12 * max(1.0, abs(exact))
        optimal += answer.energy <= exact + 1e-9 * abs(exact) + 1e-15
    rate = optimal / len(problems)
    print(f"swap-tabu found the exhaustive optimum on {rate:.1%} of {len(problems)} blocks")
    assert rate >= 0.95


def test_grouped_blocks_reach_the_exhaustive_optimum():
    for seed in range(5):
        problem = pruning_block(16, 40 + seed, groups=np.arange(16) % 4, counts=[1, 2, 3, 2])
        answer = solve(problem, SOLVER, seed=seed, iterations=100, start="random")
        assert answer.energy == pytest.approx(solve(problem, "exhaustive").energy, rel=1e-9)


@pytest.mark.parametrize("start", ["random", "x0"])
def test_every_answer_keeps_exact_group_counts(start):
    groups = np.arange(32) // 4  # N:M-like: 2 of every 4 pruned
    problems = [pruning_block(32, seed, groups=groups, counts=[2] * 8, with_x0=True) for seed in range(4)]
    problems += [pruning_block(48, 20 + seed, groups=np.arange(48) % 3, counts=[5, 9, 1], with_x0=True)
                 for seed in range(2)]
    problems += [pruning_block(80, 50 + seed, k=13, with_x0=True) for seed in range(2)]  # one large group
    for problem, answer in zip(problems, solve_batch(problems, SOLVER, seed=1, iterations=60, start=start)):
        assert np.array_equal(problem.group_sums(answer.x), problem.counts)
        assert set(np.unique(answer.x)) <= {0, 1}
        assert answer.metadata["start"] == start


def steepest_swap_descent(problem: BlockProblem) -> list[np.ndarray]:
    """The states of a best-improving swap descent from x0 (swaps inside groups), by numpy."""
    Q = problem.dense_Q()
    x = problem.x0.astype(np.float64).copy()
    states = [x.copy()]
    same_group = problem.group_of[:, None] == problem.group_of[None, :]
    while True:
        h = Q @ x
        d = np.where(x == 1, np.diag(Q) - 2 * h, np.diag(Q) + 2 * h)
        delta = d[:, None] + d[None, :] - 2 * Q  # [i, j]: i comes in, j goes out
        allowed = (x[:, None] == 0) & (x[None, :] == 1) & same_group
        delta[~allowed] = np.inf
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if not delta[i, j] < 0:
            return states
        x[i], x[j] = 1.0, 0.0
        states.append(x.copy())


def with_outlier_channels(problem: BlockProblem, channels: list[int], factor: float) -> BlockProblem:
    """The block with a few variables' rows and columns of Q scaled by ``factor`` (outlier input channels)."""
    scale = np.ones(problem.num_variables)
    scale[channels] = factor
    Q = (scale[:, None] * problem.dense_Q() * scale[None, :]).astype(np.float32)
    return BlockProblem.dense(Q, groups=problem.group_of, counts=problem.counts)


@pytest.mark.parametrize("groups, counts, heavy", [
    (None, None, False),  # one group of 80: the bound-pruned scan
    (None, None, True),  # the same with heavy columns (outlier channels): their own bound
    (np.arange(80) // 40, [15, 26], False),  # two large groups: pruned scan in each
    (np.arange(80) // 40, [15, 26], True),
    (np.arange(80) % 20, [2] * 20, False),  # groups of 4: the pair-by-pair scan
])
def test_without_tabu_each_iteration_takes_the_best_swap(groups, counts, heavy):
    """tenure 0 turns the search into a steepest descent, which numpy can follow step by step."""
    for seed in range(3):
        problem = pruning_block(80, 60 + seed, k=None if groups is not None else 30, groups=groups, counts=counts)
        if heavy:
            problem = with_outlier_channels(problem, [3, 17, 50, 66], 25.0)
            for members in problem.group_members():
                block = problem.dense_Q()[np.ix_(members, members)].astype(np.float64)
                np.fill_diagonal(block, -np.inf)
                assert len(swap_tabu_cpu.heavy_columns(block)) >= 2  # the case under test
        problem = problem.with_x0(solve(problem, SOLVER, seed=seed, iterations=0, start="random").x)
        states = steepest_swap_descent(problem)
        assert len(states) > 5
        for steps in (1, len(states) - 1):
            answer = solve(problem, SOLVER, seed=seed, restarts=1, tenure=0, iterations=steps)
            assert np.array_equal(answer.x, states[steps].astype(np.uint8))


def test_small_groups_break_ties_by_index_whatever_the_slot_order():
    """Groups of ≤ SMALL_GROUP variables are scanned from their [ones | zeros] slots, whose order
    changes with every move; a tie between equal best swaps must still go to the first group, then
    the lowest j (out), then the lowest i (in), as a scan in index order would. Twin variables (the
    same row of Q) make ties. While each step improves, the best state after N iterations (tenure 0)
    is the descent's N-th state."""
    size, groups = 48, np.arange(48) // 16  # three groups of 16, eight ones each: moved again and again
    twin = np.arange(size) // 2
    ties = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        upper = np.triu(rng.integers(0, 4, (size // 2, size // 2)))
        Q = (upper + upper.T)[np.ix_(twin, twin)].astype(np.float32)
        problem = BlockProblem.dense(Q, groups=groups, counts=[8] * 3)
        problem = problem.with_x0(solve(problem, SOLVER, seed=seed, iterations=0, start="random").x)
        x, Qd, steps = problem.x0.astype(np.float64), Q.astype(np.float64), 0
        while True:
            h = Qd @ x
            d = np.where(x == 1, np.diag(Qd) - 2 * h, np.diag(Qd) + 2 * h)
            moves = [(d[i] + d[j] - 2 * Qd[i, j], groups[j], j, i) for j in np.flatnonzero(x == 1)
                     for i in np.flatnonzero((x == 0) & (groups == groups[j]))]
            best = min(moves)
            if best[0] >= 0:
                break
            ties += sum(move[0] == best[0] for move in moves) > 1
            x[best[3]], x[best[2]] = 1.0, 0.0
            steps += 1
            answer = solve(problem, SOLVER, seed=0, restarts=1, tenure=0, stall=0, iterations=steps)
            assert np.array_equal(answer.x, x.astype(np.uint8)), (seed, steps)
    assert ties >= 8  # the case under test


def drop_add_walk(problem: BlockProblem, steps: int) -> np.ndarray:
    """The best state of ``steps`` drop-add moves from x0 without tabus, by numpy: drop the one with the
    lowest d_j over all groups (lowest index on ties), add the zero of j's group with the lowest
    d_i − 2Q_ij (lowest index on ties); the best state is replaced only by a strictly lower one."""
    Q = problem.dense_Q()
    x = problem.x0.astype(np.float64).copy()
    energy = best_energy = x @ Q @ x
    best = x.copy()
    for _ in range(steps):
        h = Q @ x
        drops = np.where(x == 1, np.diag(Q) - 2 * h, np.inf)
        j = int(np.argmin(drops))
        adds = np.where((x == 0) & (problem.group_of == problem.group_of[j]), np.diag(Q) + 2 * h - 2 * Q[j], np.inf)
        i = int(np.argmin(adds))
        x[i], x[j] = 1.0, 0.0
        energy += drops[j] + adds[i]
        if energy < best_energy:
            best_energy, best = energy, x.copy()
    return best.astype(np.uint8)


@pytest.mark.parametrize("groups, counts", [
    (None, None),  # one group of 60
    (np.arange(60) // 30, [11, 19]),  # two large groups: the drop is chosen across both
    (np.arange(60) % 15, [2] * 15),  # groups of 4 (N:M)
])
def test_drop_add_takes_its_drop_then_its_add_step_by_step(groups, counts):
    """move="drop-add", tenure 0, no kicks: the kernel walks the same states as numpy (integer Q, so the
    float64 sums are exact and ties are real: they must go to the lowest index)."""
    for seed in range(3):
        rng = np.random.default_rng(90 + seed)
        upper = np.triu(rng.integers(-6, 7, (60, 60)))
        Q = (upper + upper.T).astype(np.float32)
        problem = BlockProblem.dense(Q, k=None if groups is not None else 23, groups=groups, counts=counts)
        problem = problem.with_x0(solve(problem, SOLVER, seed=seed, iterations=0, start="random").x)
        for steps in (1, 2, 9, 40):
            answer = solve(problem, SOLVER, seed=seed, restarts=1, tenure=0, stall=0, iterations=steps,
                           move="drop-add")
            assert np.array_equal(answer.x, drop_add_walk(problem, steps)), (seed, steps)
            assert answer.metadata["move"] == "drop-add"


def test_each_move_has_its_own_tuned_defaults_and_given_values_win():
    best, drop_add = swap_tabu.TabuParams.parse({}), swap_tabu.TabuParams.parse({"move": "drop-add"})
    assert (best.tenure, best.stall) == (2, 100) and (drop_add.tenure, drop_add.stall) == (3, 400)
    given = swap_tabu.TabuParams.parse({"move": "drop-add", "tenure": 1, "stall": 0})
    assert (given.tenure, given.stall) == (1, 0)
    kicks = {size: swap_tabu.kick_swaps(BlockProblem.dense(np.eye(size, dtype=np.float32), k=9), None, "drop-add")
             for size in (40, 128, 256, 512)}
    assert kicks == {40: 2, 128: 4, 256: 8, 512: 8}  # B/32, at least 2, at most 8
    assert swap_tabu.kick_swaps(BlockProblem.dense(np.eye(512, dtype=np.float32), k=9), None) == 32  # best: B/16
    assert swap_tabu.kick_swaps(BlockProblem.dense(np.eye(512, dtype=np.float32), k=9), 5, "drop-add") == 5


def test_drop_add_reaches_the_exhaustive_optimum_and_keeps_counts():
    problems = [pruning_block(16, seed) for seed in range(100)]
    problems += [pruning_block(24, 200 + seed, groups=np.arange(24) // 4, counts=[1, 2, 3, 2, 1, 2])
                 for seed in range(20)]
    answers = solve_batch(problems, SOLVER, seed=3, iterations=400, move="drop-add")
    optimal = 0
    for problem, answer in zip(problems, answers):
        exact = enumerated_minimum(problem)
        assert np.array_equal(problem.group_sums(answer.x), problem.counts)
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9, abs=1e-12)
        assert answer.energy >= exact - 1e-12 * max(1.0, abs(exact))
        optimal += answer.energy <= exact + 1e-9 * abs(exact) + 1e-15
    assert optimal / len(problems) >= 0.95


def test_x0_start_never_returns_worse_than_x0_and_zero_iterations_return_it():
    problems = [pruning_block(48, seed, k=20, with_x0=True) for seed in range(4)]
    for problem, answer in zip(problems, solve_batch(problems, SOLVER, seed=3, iterations=20)):
        assert answer.energy <= problem.energy(problem.x0) + 1e-15
    untouched = solve(problems[0], SOLVER, seed=3, iterations=0)
    assert np.array_equal(untouched.x, problems[0].x0)


def test_problems_without_any_possible_swap_return_their_only_answer():
    problems = [pruning_block(8, 1, k=0), pruning_block(8, 2, k=8),
                pruning_block(8, 3, groups=np.arange(8) // 4, counts=[0, 4])]
    for problem, answer in zip(problems, solve_batch(problems, SOLVER, seed=0)):
        assert problem.is_feasible(answer.x) and answer.metadata["moves"] == 0


def test_a_group_with_one_possible_swap_keeps_moving_when_everything_is_tabu():
    problem = pruning_block(2, 5, k=1, with_x0=True)
    answer = solve(problem, SOLVER, seed=0, iterations=7, restarts=1, tenure=50)
    assert answer.metadata["moves"] == 7  # every move is tabu after the first; the best one is taken anyway
    assert answer.energy == pytest.approx(solve(problem, "exhaustive").energy, rel=1e-9)


def test_anneal_first_then_search_from_the_annealed_answer():
    problem = pruning_block(64, 9, k=32, with_x0=True)
    answer = solve(problem, SOLVER, seed=2, anneal_sweeps=50, iterations=30)
    assert answer.metadata["start"] == "sa" and answer.metadata["anneal_sweeps"] == 50
    assert answer.energy <= answer.metadata["anneal_energy"] + 1e-15
    assert np.array_equal(answer.x, solve(problem, SOLVER, seed=2, anneal_sweeps=50, iterations=30).x)


def test_large_groups_are_annealed_first_unless_told_otherwise():
    large = pruning_block(520, 3, k=200, with_x0=True)  # one group of 520 > 512
    small = pruning_block(64, 4, k=20, with_x0=True)
    both = solve_batch([large, small], SOLVER, seed=1, iterations=5, restarts=1)
    assert both[0].metadata["start"] == "sa" and both[0].metadata["anneal_sweeps"] == swap_tabu.DEFAULT_ANNEAL_SWEEPS
    assert both[1].metadata["start"] == "x0" and "anneal_sweeps" not in both[1].metadata
    assert np.array_equal(both[0].x, solve(large, SOLVER, seed=1, iterations=5, restarts=1).x)
    assert solve(large, SOLVER, seed=1, iterations=5, restarts=1, anneal_sweeps=0).metadata["start"] == "x0"


# ---------------------------------------------------------------------- forms and reproducibility
def test_factored_problem_gives_the_same_answer_as_its_dense_equivalent():
    for seed in range(4):
        factored = factored_block(24, 3, 100 + seed, k=9)
        dense = BlockProblem.dense(factored.dense_Q(), k=9, offset=factored.offset)
        from_factored = solve(factored, SOLVER, seed=seed, iterations=40, start="random")
        from_dense = solve(dense, SOLVER, seed=seed, iterations=40, start="random")
        assert np.array_equal(from_factored.x, from_dense.x)
        assert from_factored.energy == pytest.approx(from_dense.energy, rel=1e-5)
        assert from_factored.energy == pytest.approx(direct_energy(factored, from_factored.x), rel=1e-9)


def test_same_seed_same_answer_alone_and_inside_a_mixed_batch():
    target = pruning_block(40, 11, groups=np.arange(40) // 8, counts=[3, 4, 2, 5, 4], with_x0=True)
    factored = factored_block(30, 5, 12, k=11)
    others = [pruning_block(64, 13, k=20), factored_block(50, 8, 14, k=9), pruning_block(20, 15, k=4)]
    params = dict(seed=5, iterations=40, restarts=3, start="random")
    alone = solve(target, SOLVER, **params)
    alone_factored = solve(factored, SOLVER, **params)
    batch = solve_batch([others[0], factored, others[1], target, others[2]], SOLVER, **params)
    for answer, single in ((batch[3], alone), (batch[1], alone_factored), (solve(target, SOLVER, **params), alone)):
        assert np.array_equal(answer.x, single.x) and answer.energy == single.energy
        assert answer.metadata["moves"] == single.metadata["moves"]
    starts = [solve(target, SOLVER, seed=seed, iterations=0, start="random").x for seed in (5, 6)]
    assert not np.array_equal(*starts)  # the seed does reach the chains


def test_time_limit_is_honoured_and_the_best_so_far_returned():
    problem = pruning_block(512, 21, k=256)
    solve(problem, SOLVER, seed=0, iterations=1)
    started = time.perf_counter()
    answer = solve(problem, SOLVER, seed=0, iterations=10_000_000, time_limit=0.3)
    assert time.perf_counter() - started < 2.0
    assert answer.metadata["stopped_by_time_limit"] and 0 < answer.sweeps < 10_000_000
    assert problem.is_feasible(answer.x)


# ---------------------------------------------------------------------- parameters and limits
@pytest.mark.parametrize(
    "params, message",
    [
        ({"restarts": 0}, "restarts"),
        ({"iterations": -1}, "iterations"),
        ({"iterations": 1.5}, "iterations"),
        ({"iterations": 5, "sweeps": 5}, "not both"),
        ({"tenure": -1}, "tenure"),
        ({"anneal_sweeps": "many"}, "anneal_sweeps"),
        ({"time_limit": -1}, "time_limit"),
        ({"time_limit": "soon"}, "time_limit"),
        ({"start": "warm"}, "start"),
        ({"start": "x0"}, "no x0"),
        ({"seed": "abc"}, "seed"),
        ({"beta_range": (1, 2)}, "unknown parameter"),
        ({"move": "triple"}, "move"),
    ],
)
def test_bad_parameters_are_usage_errors(params, message):
    with pytest.raises(UsageError, match=message):
        solve(pruning_block(8, 0, k=3), SOLVER, **params)


def test_blocks_above_the_limit_are_refused_before_any_work():
    too_big = BlockProblem.factored(np.ones((1, 4097), np.float32), k=2)
    with pytest.raises(ProblemTooLargeError, match="at most 4096"):
        solve(too_big, SOLVER)


def test_registered_with_its_capabilities():
    assert SOLVER in solver_names()
    info = capabilities(SOLVER)
    assert info.installed and info.constraints == "native" and info.max_variables == 4096 and info.deterministic


def test_cli_solve_and_solvers(tmp_path, capsys):
    path = tmp_path / "block.npz"
    factored_block(12, 3, 2, groups=np.arange(12) // 6, counts=[2, 3]).save_npz(path)
    assert main(["solve", str(path), "--solver", SOLVER, "--json", "--seed", "4", "--sweeps", "50"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    problem = BlockProblem.load_npz(path)
    assert record["solver"] == SOLVER
    assert record["energy"] == pytest.approx(solve(problem, "exhaustive").energy, rel=1e-9)
    assert main(["solvers", "--json"]) == 0
    listed = capsys.readouterr().out
    assert SOLVER in listed


# ---------------------------------------------------------------------- kicks
@pytest.mark.parametrize("groups, counts", [(None, None), (np.arange(24) // 4, [1, 2, 3, 2, 1, 2])])
def test_kicks_keep_counts_never_lose_the_best_and_reach_the_optimum(groups, counts):
    """Kicks (a few random swaps from the best state after `stall` idle iterations) on small blocks."""
    for seed in range(4):
        size = 16 if groups is None else 24
        problem = pruning_block(size, 80 + seed, k=None if groups is not None else 7,
                                groups=groups, counts=counts, with_x0=True)
        exact = enumerated_minimum(problem)
        answer = solve(problem, SOLVER, seed=seed, iterations=400, stall=3, kick=3)
        assert np.array_equal(problem.group_sums(answer.x), problem.counts)
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9)
        assert answer.energy <= problem.energy(problem.x0) + 1e-15
        assert answer.energy == pytest.approx(exact, rel=1e-9)
        assert answer.metadata["stall"] == 3 and answer.metadata["kick"] == 3


def test_kicked_runs_are_reproducible_and_cut_by_chunks_the_same():
    from qsurgeon.worker.solvers import swap_tabu, swap_tabu_cpu

    problem = pruning_block(64, 7, groups=np.arange(64) // 8, counts=[4] * 8)
    first = solve(problem, SOLVER, seed=5, iterations=300, stall=10, kick=4)
    alone = solve(problem, SOLVER, seed=5, iterations=300, stall=10, kick=4)
    in_batch = solve_batch([pruning_block(40, 1, k=13), problem], SOLVER, seed=5, iterations=300, stall=10, kick=4)[1]
    assert np.array_equal(first.x, alone.x) and np.array_equal(first.x, in_batch.x)
    # the same run cut into chunks (as a time limit does) takes the same path
    options = swap_tabu.TabuParams.parse({"seed": 5, "iterations": 300, "stall": 10, "kick": 4})
    start = problem.with_x0(swap_tabu.greedy_start(problem))
    kernel = swap_tabu_cpu.kernel_problem(swap_tabu.dense_kernel_Q(start), start.group_of, start.counts, start.x0,
                                          (2, 2, 2), (10, 4))
    keys = swap_tabu._keys(start, swap_tabu.dense_kernel_Q(start), 5, options.restarts)[None]
    whole = swap_tabu_cpu.run_batch([kernel], keys, np.array([True]), 300, None)[0]
    original_next_chunk = swap_tabu_cpu.next_chunk
    try:
        swap_tabu_cpu.next_chunk = lambda left, *rest: min(left, 7)
        cut = swap_tabu_cpu._run_part([kernel], keys, np.array([True]), 300, deadline=time.perf_counter() + 1e6)[0]
    finally:
        swap_tabu_cpu.next_chunk = original_next_chunk
    assert np.array_equal(whole.best_x, cut.best_x) and np.array_equal(whole.moves, cut.moves)


def test_runs_shorter_than_the_stall_are_unchanged_by_kicks():
    """iCBS's 1 × 50 iterations from x0 never kick: same answers as without kicks."""
    for seed in range(3):
        problem = pruning_block(128, seed, k=64, with_x0=True)
        kicked = solve(problem, SOLVER, seed=seed, restarts=1, iterations=50, start="x0")
        plain = solve(problem, SOLVER, seed=seed, restarts=1, iterations=50, start="x0", stall=0)
        assert np.array_equal(kicked.x, plain.x)
