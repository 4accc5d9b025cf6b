"""The ``sa`` solver: feasibility, energies, optimality on small blocks, reproducibility, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from block_instances import direct_energy, enumerated_minimum, factored_block, pruning_block

from qsurgeon.client.cli import main
from qsurgeon.client.errors import SolverUnavailableError, UsageError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers import sa, sa_rng


# ---------------------------------------------------------------------- kernel conventions
def test_kernel_random_numbers_follow_the_reference():
    from qsurgeon.worker.solvers import sa_cpu

    for key, counter in [(0, 0), (12345, 7), (2**64 - 1, 3 * 10**9), (0x9E3779B97F4A7C15, 42)]:
        assert int(sa_cpu._draw(np.uint64(key), counter)) == sa_rng.draw(key, counter)


def test_chain_keys_depend_on_seed_restart_and_content_only():
    digest = sa_rng.problem_digest(np.zeros(4, np.int32), np.array([2], np.int32), None, np.ones(4, np.float32))
    keys = sa_rng.chain_keys(digest, seed=1, restarts=3)
    assert np.array_equal(keys, sa_rng.chain_keys(digest, seed=1, restarts=3))
    assert len({int(k) for k in keys.reshape(-1)}) == 9
    assert not np.array_equal(keys, sa_rng.chain_keys(digest, seed=2, restarts=3))


# ---------------------------------------------------------------------- answers
def test_energies_equal_an_independent_computation():
    problems = [pruning_block(24, 1, k=10), factored_block(20, 3, 2, k=7),
                pruning_block(16, 3, groups=np.arange(16) // 4, counts=[2, 2, 2, 2])]
    for problem, answer in zip(problems, solve_batch(problems, "sa", seed=0, sweeps=50)):
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9, abs=1e-12)
        assert "reported_energy" not in answer.metadata  # our own float64 figure agreed with solve's
        assert answer.solver == "sa" and answer.restarts == 4 and answer.sweeps == 50


def test_finds_the_exhaustive_optimum_on_small_pruning_blocks():
    problems = [pruning_block(16, seed) for seed in range(200)]
    answers = solve_batch(problems, "sa", seed=7)
    optimal = 0
    for problem, answer in zip(problems, answers):
        exact = enumerated_minimum(problem)
        assert answer.energy >= exact - 1e-12 * max(1.0, abs(exact))
        optimal += answer.energy <= exact + 1e-9 * abs(exact) + 1e-15
    rate = optimal / len(problems)
    print(f"sa found the exhaustive optimum on {rate:.1%} of {len(problems)} blocks")
    assert rate >= 0.95


@pytest.mark.parametrize("start", ["random", "x0"])
def test_every_answer_keeps_exact_group_counts(start):
    groups = np.arange(32) // 4  # N:M-like: 2 of every 4 pruned
    counts = [2] * 8
    problems = [pruning_block(32, seed, groups=groups, counts=counts, with_x0=True) for seed in range(6)]
    problems += [pruning_block(40, 50 + seed, k=13, with_x0=True) for seed in range(3)]
    for problem, answer in zip(problems, solve_batch(problems, "sa", seed=1, sweeps=100, start=start)):
        assert np.array_equal(problem.group_sums(answer.x), problem.counts)
        assert set(np.unique(answer.x)) <= {0, 1}
        assert answer.metadata["start"] == start


def test_x0_start_never_returns_worse_than_x0():
    problems = [pruning_block(48, seed, k=20, with_x0=True) for seed in range(5)]
    for problem, answer in zip(problems, solve_batch(problems, "sa", seed=3, sweeps=30, restarts=2)):
        assert answer.energy <= problem.energy(problem.x0) + 1e-15
    untouched = solve(problems[0], "sa", seed=3, sweeps=0)
    assert np.array_equal(untouched.x, problems[0].x0)


def _outlier_block(size: int, seed: int, k: int, groups=None, counts=None) -> BlockProblem:
    """A pruning block whose inputs have a few outlier channels (scaled 10–20×), as in real rows."""
    base = pruning_block(size, seed, k=k, groups=groups, counts=counts)
    scale = np.ones(size)
    scale[np.random.default_rng(seed).choice(size, size=max(1, size // 32), replace=False)] = [10.0, 20.0][seed % 2]
    Q = (scale[:, None] * np.asarray(base.Q, np.float64) * scale[None, :]).astype(np.float32)
    return BlockProblem.dense(Q, k=k, groups=groups, counts=counts)


def test_the_schedule_scale_ignores_outlier_swaps():
    from qsurgeon.worker.solvers.sa import GREEDY_SCALE_QUANTILE, robust_scale

    deltas = np.random.default_rng(0).exponential(1e-4, 1024)
    wrecked = deltas.copy()
    wrecked[::50] *= 1000.0  # 2 % of the swaps touch an outlier channel
    assert wrecked.mean() > 10 * deltas.mean()  # a mean-based scale would make the schedule 10× hotter
    assert robust_scale(wrecked, GREEDY_SCALE_QUANTILE) == pytest.approx(robust_scale(deltas, GREEDY_SCALE_QUANTILE),
                                                                         rel=0.1)
    assert robust_scale(np.zeros(8), 0.25) == 1.0 and robust_scale(np.array([0.0, -3e-5]), 0.25) == 3e-5


def test_from_scratch_the_scale_comes_from_the_greedy_state_and_the_answer_never_loses_to_it():
    from qsurgeon.worker.solvers.greedy import greedy_start, swap_deltas

    for seed in range(4):
        problem = _outlier_block(96, seed, k=40)
        start = greedy_start(problem)
        answer = solve(problem, "sa", seed=seed, sweeps=60, restarts=2)
        assert answer.metadata["start"] == "greedy"
        assert answer.metadata["beta_range"] == list(sa.DEFAULT_BETA_RANGE_GREEDY_LARGE_GROUPS)
        expected = sa.robust_scale(swap_deltas(problem, start), sa.GREEDY_SCALE_QUANTILE)
        assert answer.metadata["energy_scale"] == pytest.approx(expected, rel=1e-12)
        assert answer.energy <= problem.energy(start) + 1e-15
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9)
        assert int(answer.x.sum()) == 40


def test_the_greedy_schedule_depends_on_the_group_sizes_only_from_the_greedy_start():
    nm = pruning_block(64, 2, groups=np.arange(64) // 8, counts=[4] * 8)
    single = pruning_block(64, 3, k=30)
    with_x0 = pruning_block(64, 4, k=30, with_x0=True)
    answers = solve_batch([nm, single, with_x0], "sa", seed=1, sweeps=20, device="cpu")
    assert [a.metadata["beta_range"] for a in answers] == [
        list(sa.DEFAULT_BETA_RANGE_GREEDY), list(sa.DEFAULT_BETA_RANGE_GREEDY_LARGE_GROUPS),
        list(sa.DEFAULT_BETA_RANGE_X0)]
    assert sa.has_small_groups(nm) and not sa.has_small_groups(single)
    given = solve(single, "sa", seed=1, sweeps=20, beta_range=(3, 30))
    assert given.metadata["beta_range"] == [3, 30]  # an explicit range applies to every start


def test_small_single_group_blocks_from_scratch_reach_the_brute_force_minimum():
    problems = [_outlier_block(14, seed, k=int(4 + seed % 7)) for seed in range(40)]
    optimal = 0
    for problem, answer in zip(problems, solve_batch(problems, "sa", seed=5, device="cpu")):
        exact = enumerated_minimum(problem)
        assert answer.energy >= exact - 1e-12 * max(1.0, abs(exact))
        optimal += answer.energy <= exact + 1e-9 * abs(exact) + 1e-15
    assert optimal >= 38  # measured: 40 of 40


def test_factored_problem_agrees_with_its_dense_equivalent():
    for seed in range(5):
        factored = factored_block(18, 2, 100 + seed, k=9)  # 8·r < B: the factored kernel
        dense = BlockProblem.dense(factored.dense_Q(), k=9, offset=factored.offset)  # Q rounded to float32
        from_factored = solve(factored, "sa", seed=seed, restarts=8)
        from_dense = solve(dense, "sa", seed=seed, restarts=8)
        assert from_factored.metadata["kernel_form"] == "factored"
        assert from_factored.energy == pytest.approx(solve(factored, "exhaustive").energy, rel=1e-9)
        assert from_dense.energy == pytest.approx(solve(dense, "exhaustive").energy, rel=1e-9)
        # the two forms score any assignment alike, up to the float32 rounding of the dense Q
        assert dense.energy(from_factored.x) == pytest.approx(from_factored.energy, rel=1e-4)
        assert from_dense.energy == pytest.approx(from_factored.energy, rel=1e-4)


def test_high_rank_factored_blocks_anneal_in_dense_form_and_agree():
    for seed in range(3):
        factored = factored_block(16, 12, 200 + seed, k=8)
        answer = solve(factored, "sa", seed=seed, restarts=8)
        assert answer.metadata["kernel_form"] == "dense"
        assert answer.energy == pytest.approx(solve(factored, "exhaustive").energy, rel=1e-6)
        assert answer.energy == pytest.approx(direct_energy(factored, answer.x), rel=1e-9)


def test_problems_without_any_possible_swap_return_their_only_answer():
    problems = [pruning_block(8, 1, k=0), pruning_block(8, 2, k=8),
                pruning_block(8, 3, groups=np.arange(8) // 4, counts=[0, 4])]
    for problem, answer in zip(problems, solve_batch(problems, "sa", seed=0)):
        assert problem.is_feasible(answer.x)
        assert answer.metadata["acceptance_rate"] == 0.0


# ---------------------------------------------------------------------- reproducibility
def test_same_seed_same_answer_alone_and_inside_a_mixed_batch():
    target = pruning_block(40, 11, groups=np.arange(40) // 8, counts=[3, 4, 2, 5, 4], with_x0=True)
    factored = factored_block(30, 5, 12, k=11)
    others = [pruning_block(64, 13, k=20), factored_block(50, 8, 14, k=9), pruning_block(20, 15, k=4),
              factored_block(64, 3, 16, k=30)]
    alone = solve(target, "sa", seed=5, sweeps=60, restarts=3)
    alone_factored = solve(factored, "sa", seed=5, sweeps=60, restarts=3)
    again = solve(target, "sa", seed=5, sweeps=60, restarts=3)
    low_rank = others[3]  # 8·r < B: the factored kernel
    alone_low_rank = solve(low_rank, "sa", seed=5, sweeps=60, restarts=3)
    batch = solve_batch(others[:2] + [factored, others[2], target, low_rank], "sa", seed=5, sweeps=60, restarts=3)
    assert np.array_equal(batch[5].x, alone_low_rank.x) and batch[5].energy == alone_low_rank.energy
    assert alone_low_rank.metadata["kernel_form"] == "factored"
    for answer in (again, batch[4]):
        assert np.array_equal(answer.x, alone.x) and answer.energy == alone.energy
        assert answer.metadata["acceptance_rate"] == alone.metadata["acceptance_rate"]
    assert np.array_equal(batch[2].x, alone_factored.x) and batch[2].energy == alone_factored.energy
    other_seed = solve(target, "sa", seed=6, sweeps=60, restarts=3)
    assert other_seed.metadata["acceptance_rate"] != alone.metadata["acceptance_rate"]


def test_time_limit_is_honoured_and_the_best_so_far_returned():
    problem = pruning_block(512, 21, k=256)
    solve(problem, "sa", seed=0, sweeps=1)  # compile / warm up outside the timing
    started = time.perf_counter()
    answer = solve(problem, "sa", seed=0, sweeps=1_000_000, restarts=2, time_limit=0.3)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0
    assert answer.metadata["stopped_by_time_limit"] and 0 < answer.sweeps < 1_000_000
    assert problem.is_feasible(answer.x)


# ---------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "params, message",
    [
        ({"restarts": 0}, "restarts"),
        ({"sweeps": -1}, "sweeps"),
        ({"sweeps": 1.5}, "sweeps"),
        ({"beta_range": (0, 10)}, "beta_range"),
        ({"beta_range": "hot"}, "beta_range"),
        ({"time_limit": -1}, "time_limit"),
        ({"start": "warm"}, "start"),
        ({"start": "x0"}, "no x0"),
        ({"device": "tpu"}, "device"),
        ({"seed": "abc"}, "seed"),
        ({"temperature": 1}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_usage_errors(params, message):
    with pytest.raises(UsageError, match=message):
        solve(pruning_block(8, 0, k=3), "sa", **params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no CUDA device exists")
def test_cuda_without_a_device_says_so():
    with pytest.raises(SolverUnavailableError, match="no CUDA device"):
        solve(pruning_block(8, 0, k=3), "sa", device="cuda")


# ---------------------------------------------------------------------- command line
def test_cli_solve_prints_json_lines_and_writes_solutions(tmp_path, capsys):
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    pruning_block(12, 1, k=5).save_npz(first)
    factored_block(10, 3, 2, groups=np.arange(10) // 5, counts=[2, 3]).save_npz(second)
    assert main(["solve", str(first), str(second), "--solver", "sa", "--json", "--seed", "4", "--sweeps", "200"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (first, second)):
        record = json.loads(line)
        problem = BlockProblem.load_npz(path)
        assert record["file"] == str(path) and record["solver"] == "sa" and record["seconds"] >= 0
        assert record["energy"] == pytest.approx(direct_energy(problem, np.array(record["x"])), rel=1e-9)
        assert record["energy"] == pytest.approx(solve(problem, "exhaustive").energy, rel=1e-9)
        with np.load(path.with_name(path.stem + ".solution.npz")) as saved:
            assert saved["x"].tolist() == record["x"]


def _write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize(
    "arrays, extra, reason",
    [
        ({"Q": np.triu(np.ones((4, 4), np.float32)), "k": np.int64(2)}, [], "symmetric"),
        ({"Q": np.eye(4, dtype=np.float32), "k": np.int64(7)}, [], "k must lie"),
        ({"Q": np.eye(30, dtype=np.float32), "k": np.int64(3)}, ["--solver", "exhaustive"], "at most 24"),
    ],
)
def test_cli_solve_refuses_bad_files_with_one_line(tmp_path, capsys, arrays, extra, reason):
    path = tmp_path / "bad.npz"
    _write_npz(path, **arrays)
    assert main(["solve", str(path), *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and reason in error


# ---------------------------------------------------------------------- torch (CUDA) kernel
def test_torch_random_numbers_follow_the_reference():
    from qsurgeon.worker.solvers import sa_cuda

    keys = [0, 12345, 2**64 - 1, 0x9E3779B97F4A7C15]
    as_int64 = torch.tensor(np.array(keys, dtype=np.uint64).view(np.int64))
    for counter in (0, 7, 3 * 10**9):
        drawn = sa_cuda.draw(as_int64, counter).numpy().view(np.uint64)
        assert [int(value) for value in drawn] == [sa_rng.draw(key, counter) for key in keys]


def test_torch_kernel_follows_the_cpu_kernel_chain_for_chain():
    """The CUDA code path, run on the CPU device, walks the same chains as the numba kernel."""
    from qsurgeon.worker.solvers import sa, sa_cpu, sa_cuda

    problems = [pruning_block(12, 1, groups=np.arange(12) // 4, counts=[1, 2, 3], with_x0=True),
                pruning_block(12, 2, k=5), pruning_block(8, 3, k=3, with_x0=True), factored_block(10, 3, 4, k=4),
                factored_block(9, 2, 5, groups=np.arange(9) // 3, counts=[1, 2, 1])]
    options = sa.AnnealParams.parse({"seed": 3, "sweeps": 12, "restarts": 2, "device": "cpu", "beta_range": (0.3, 30)})
    use_x0 = np.array([p.x0 is not None for p in problems])
    keys = np.stack([sa_rng.chain_keys(sa._digest(p), options.seed, options.restarts) for p in problems])
    betas, _ = sa._beta_table(options)
    on_cpu = sa_cpu.run_batch(problems, keys, use_x0, use_x0.astype(np.int64), betas, None)
    on_torch = sa_cuda.run_batch(problems, keys, use_x0, use_x0.astype(np.int64), betas, None, device="cpu")
    for problem, ours, theirs in zip(problems, on_cpu, on_torch):
        assert np.array_equal(ours.accepted, theirs.accepted) and ours.accepted.sum() > 0
        assert np.array_equal(ours.best_x, theirs.best_x)
        if problem.is_factored:  # the O(r) dot product is summed in another order on torch
            assert np.allclose(ours.kernel_energy, theirs.kernel_energy, rtol=1e-12, atol=1e-15)
        else:
            assert np.array_equal(ours.kernel_energy, theirs.kernel_energy)
            assert np.array_equal(ours.scale, theirs.scale)


# ---------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
def test_cuda_answers_are_feasible_correct_and_reproducible():
    problems = [pruning_block(32, seed, groups=np.arange(32) // 4, counts=[2] * 8) for seed in range(4)]
    problems += [factored_block(40, 6, 9, k=17), pruning_block(16, 77, k=6)]
    first = solve_batch(problems, "sa", seed=2, sweeps=200, device="cuda")
    second = solve_batch(problems[::-1], "sa", seed=2, sweeps=200, device="cuda")[::-1]
    for problem, a, b in zip(problems, first, second):
        assert np.array_equal(problem.group_sums(a.x), problem.counts)
        assert a.energy == pytest.approx(direct_energy(problem, a.x), rel=1e-9, abs=1e-12)
        assert np.array_equal(a.x, b.x) and a.energy == b.energy
        assert a.metadata["device"] == "cuda"
    exact = solve(problems[-1], "exhaustive").energy
    assert first[-1].energy == pytest.approx(exact, rel=1e-6)


def test_stacked_views_are_annealed_in_place_with_the_same_answers():
    from qsurgeon.worker.block.stack import MatrixStack, flat_matrices

    blocks = [pruning_block(24, seed, k=9, with_x0=True) for seed in range(6)]
    stack = MatrixStack(len(blocks) * 24 * 24)
    stacked = stack.take(len(blocks), 24)
    stacked[...] = np.stack([np.asarray(block.Q, np.float32) for block in blocks])
    assert stack.used == stack.capacity
    views = [BlockProblem.dense(stacked[i], k=9, x0=block.x0, offset=block.offset) for i, block in enumerate(blocks)]
    flat = flat_matrices(views)
    assert np.shares_memory(flat, stacked) and np.array_equal(flat, stacked.reshape(-1))
    assert not flat.flags.writeable  # the solver cannot write into the caller's blocks
    shuffled = views[::-1]  # views of one buffer, but not back to back: copied
    assert not np.shares_memory(flat_matrices(shuffled), stacked)
    assert np.array_equal(flat_matrices(shuffled), stacked[::-1].reshape(-1))
    assert not np.shares_memory(flat_matrices(blocks), stacked)  # separate arrays: copied
    params = dict(sweeps=40, restarts=2, seed=5)
    for in_place, copied in zip(solve_batch(views, "sa", **params), solve_batch(blocks, "sa", **params)):
        assert np.array_equal(in_place.x, copied.x) and in_place.energy == copied.energy


def test_a_matrix_stack_hands_out_consecutive_views_and_refuses_to_overflow():
    from qsurgeon.worker.block.stack import MatrixStack, flat_matrices

    stack = MatrixStack(2 * 4 * 4 + 3 * 2 * 2)
    first, second = stack.take(2, 4), stack.take(3, 2)
    assert first.shape == (2, 4, 4) and second.shape == (3, 2, 2) and stack.used == stack.capacity
    assert second.__array_interface__["data"][0] == first.__array_interface__["data"][0] + first.nbytes
    with pytest.raises(ValueError, match="cannot hold 1 more 2×2 blocks"):
        stack.take(1, 2)
    first[...] = np.arange(first.size, dtype=np.float32).reshape(first.shape)
    mixed = [BlockProblem.dense(first[i], k=2, validate=False) for i in range(2)]
    assert np.shares_memory(flat_matrices(mixed), first)


def test_default_length_follows_each_blocks_size_alone_or_in_a_mixed_batch():
    """Without sweeps: min(32·B, 2·10⁶/B) sweeps, at least 1000 — by the block's own size, so a
    block's answer is the same alone or in a batch of other sizes; a time limit spans the call."""
    assert [sa.default_sweeps(size) for size in (8, 31, 64, 128, 256, 1024, 2000, 8192)] == [
        1000, 1000, 2048, 4096, 7812, 1953, 1000, 1000]
    small = pruning_block(24, 1, k=10)
    larger = pruning_block(40, 2, k=15)
    alone = [solve(problem, "sa", seed=3) for problem in (small, larger)]
    together = solve_batch([larger, small], "sa", seed=3)
    assert [a.sweeps for a in alone] == [1000, 1280]
    assert [a.sweeps for a in together] == [1280, 1000]
    assert np.array_equal(alone[0].x, together[1].x) and np.array_equal(alone[1].x, together[0].x)
    assert alone[1].metadata["sweeps_requested"] == 1280
    big = pruning_block(300, 4, k=120)  # 16 chains × 6666 sweeps × 300: far more than 0.1 s allows
    started = time.perf_counter()
    limited = solve_batch([big, small], "sa", seed=3, time_limit=0.1, restarts=16)
    assert time.perf_counter() - started < 5.0  # the limit spans both sizes' runs (generous: loaded CI)
    assert limited[0].metadata["stopped_by_time_limit"] and limited[0].sweeps < 6666
    for problem, answer in zip((big, small), limited):
        assert answer.energy == pytest.approx(direct_energy(problem, answer.x), rel=1e-9)
