"""The fused Triton kernel of ``sa`` (sa_triton): same chains as the CPU kernel, feasible, scored right.

Without CUDA the kernel runs in Triton's interpreter on the CPU device (TRITON_INTERPRET=1,
set here before triton is first imported), slowly (milliseconds per proposal), so these
runs are tiny; with CUDA the same tests run the compiled kernel on the GPU, and the tests
marked ``cuda`` add batch-sized checks through ``solve_batch``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from block_instances import direct_energy, enumerated_minimum, factored_block, pruning_block

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is decorated, at import
pytest.importorskip("triton")

from qsurgeon.client.errors import UsageError  # noqa: E402
from qsurgeon.worker.solve import solve, solve_batch  # noqa: E402
from qsurgeon.worker.solvers import sa, sa_cpu, sa_cuda, sa_rng, sa_triton  # noqa: E402

INTERPRETED = type(sa_triton._anneal_dense).__name__ == "InterpretedFunction"
DEVICE = "cuda" if CUDA else "cpu"
#: Share of chains that must follow the CPU kernel exactly: all in the interpreter; on a GPU the
#: float32 exponential (ex2.approx) may flip a rare Metropolis decision, after which a chain differs.
SAME_CHAINS = 1.0 if INTERPRETED else 0.9
pytestmark = pytest.mark.skipif(not CUDA and not INTERPRETED,
                                reason="no CUDA, and triton was imported before its interpreter could be asked for")


def _anneal(problems, *, seed, sweeps, restarts, kernel, beta_range=None):
    """Run the CPU kernel or the fused one on prepared chains, as sa.sample_batch prepares them."""
    options = sa.AnnealParams.parse({"seed": seed, "sweeps": sweeps, "restarts": restarts, "device": "cpu",
                                     "beta_range": beta_range})
    use_x0 = np.array([p.x0 is not None for p in problems])
    keys = np.stack([sa_rng.chain_keys(sa._digest(p), options.seed, options.restarts) for p in problems])
    betas, _ = sa._beta_table(options)
    rows = np.where(use_x0, sa.BETA_ROW["x0"], sa.BETA_ROW["random"]).astype(np.int64)
    if kernel == "cpu":
        return sa_cpu.run_batch(problems, keys, use_x0, rows, betas, None)
    return sa_cuda.run_batch(problems, keys, use_x0, rows, betas, None, device=DEVICE, kernel=kernel)


def _mixed_problems():
    return [pruning_block(12, 1, groups=np.arange(12) // 4, counts=[1, 2, 3], with_x0=True),  # N:M-like groups
            pruning_block(12, 2, k=5),  # one group, random start
            pruning_block(8, 3, k=3, with_x0=True),
            pruning_block(12, 4, groups=np.arange(12) // 4, counts=[0, 2, 4]),  # only the middle group can swap
            pruning_block(8, 5, k=0)]  # no swap possible at all


@pytest.fixture(scope="module")
def mixed_runs():
    problems = _mixed_problems()
    params = dict(seed=3, sweeps=12, restarts=2, beta_range=(0.3, 30))
    return problems, _anneal(problems, kernel="cpu", **params), _anneal(problems, kernel="fused", **params)


def test_fused_chains_follow_the_cpu_kernel(mixed_runs):
    problems, on_cpu, fused = mixed_runs
    same = []
    for problem, ours, theirs in zip(problems, on_cpu, fused):
        assert np.array_equal(ours.scale, theirs.scale)  # the start (torch, bit for bit) is shared
        for r in range(ours.accepted.shape[0]):
            same.append(ours.accepted[r] == theirs.accepted[r] and np.array_equal(ours.best_x[r], theirs.best_x[r])
                        and ours.kernel_energy[r] == theirs.kernel_energy[r])
    assert sum(int(a.accepted.sum()) for a in fused[:4]) > 0 and int(fused[4].accepted.sum()) == 0
    assert np.mean(same) >= SAME_CHAINS


def test_fused_states_are_feasible_and_their_energies_exact(mixed_runs):
    problems, _, fused = mixed_runs
    for problem, result in zip(problems, fused):
        for x, energy in zip(result.best_x, result.kernel_energy):
            assert set(np.unique(x)) <= {0, 1}
            assert np.array_equal(problem.group_sums(x), problem.counts)
            # the running float64 figure the kernel kept is the energy of the state it kept
            assert energy + problem.offset == pytest.approx(direct_energy(problem, x), rel=1e-9, abs=1e-15)
        if problem.x0 is not None:
            assert result.kernel_energy.max() + problem.offset <= direct_energy(problem, problem.x0) + 1e-15


def test_greedy_starts_follow_the_same_rows_and_scales_in_both_kernels():
    """From scratch sa.sample_batch starts every chain at the greedy state, on the β row of the block's
    group sizes (greedy or greedy-large) and with the scale taken there; both kernels must agree."""
    from qsurgeon.worker.solvers.greedy import greedy_start, swap_deltas

    scratch = [pruning_block(40, 21, k=17), pruning_block(12, 22, groups=np.arange(12) // 4, counts=[2, 2, 1])]
    options = sa.AnnealParams.parse({"seed": 4, "sweeps": 4, "restarts": 2, "device": "cpu"})
    problems = [p.with_x0(greedy_start(p)) for p in scratch]
    rows = np.array([sa.beta_row(p, "greedy") for p in scratch], np.int64)
    assert list(rows) == [sa.BETA_ROW["greedy-large"], sa.BETA_ROW["greedy"]]
    scales = np.array([sa.robust_scale(swap_deltas(p, p.x0), sa.GREEDY_SCALE_QUANTILE) for p in problems])
    keys = np.stack([sa_rng.chain_keys(sa._digest(p), options.seed, options.restarts) for p in problems])
    betas, _ = sa._beta_table(options)
    use_x0 = np.ones(len(problems), np.bool_)
    on_cpu = sa_cpu.run_batch(problems, keys, use_x0, rows, betas, None, scales=scales)
    fused = sa_cuda.run_batch(problems, keys, use_x0, rows, betas, None, device=DEVICE, scales=scales, kernel="fused")
    same = []
    for ours, theirs, scale in zip(on_cpu, fused, scales):
        assert np.all(ours.scale == scale) and np.all(theirs.scale == scale)
        same.extend(np.array_equal(ours.best_x[r], theirs.best_x[r]) and ours.accepted[r] == theirs.accepted[r]
                    for r in range(options.restarts))
    assert np.mean(same) >= SAME_CHAINS and sum(int(r.accepted.sum()) for r in fused) > 0


def test_zero_sweeps_return_the_start_and_chunks_continue_the_same_chains():
    problem = pruning_block(12, 9, groups=np.arange(12) // 6, counts=[2, 3], with_x0=True)
    untouched = _anneal([problem], seed=1, sweeps=0, restarts=2, kernel="fused")[0]
    assert all(np.array_equal(x, problem.x0) for x in untouched.best_x)
    options = sa.AnnealParams.parse({"seed": 1, "sweeps": 8, "restarts": 2, "device": "cpu", "beta_range": (0.5, 20)})
    keys = sa_rng.chain_keys(sa._digest(problem), options.seed, options.restarts)[None]
    betas, _ = sa._beta_table(options)
    fused = sa_triton.anneal
    steps = lambda chains, begin, end: chains.anneal(begin, end)  # noqa: E731 - the torch step loop
    runs = []
    for cuts in ([(0, 8, fused)], [(0, 3, fused), (3, 8, fused)], [(0, 5, fused), (5, 8, steps)]):
        chains = sa_cuda._Chains(sa_cuda._bucket([problem], [0], torch.device(DEVICE)), keys, np.array([True]),
                                 np.array([1]), betas, torch.device(DEVICE))
        chains.start()
        for begin, end, advance in cuts:
            advance(chains, begin, end)
        runs.append([t.cpu().numpy().copy() for t in (chains.x, chains.best_x, chains.best_energy, chains.accepted)])
    assert runs[0][3].sum() > 0
    for other in runs[1:]:
        for ours, theirs in zip(runs[0], other):
            assert np.array_equal(ours, theirs)


def test_fused_kernel_finds_the_exhaustive_optimum_on_tiny_blocks():
    problems = [pruning_block(8, 40 + seed, k=int(2 + seed % 5)) for seed in range(8)]
    results = _anneal(problems, seed=7, sweeps=16, restarts=2, kernel="fused")
    optimal = 0
    for problem, result in zip(problems, results):
        energy = min(direct_energy(problem, x) for x in result.best_x)
        exact = enumerated_minimum(problem)
        assert energy >= exact - 1e-12 * max(1.0, abs(exact))
        optimal += energy <= exact + 1e-9 * abs(exact) + 1e-15
    assert optimal >= 7


def test_fused_quality_equals_the_cpu_kernel_at_equal_sweeps():
    count, sweeps, restarts = (16, 200, 4) if CUDA else (2, 3, 1)
    problems = [pruning_block(64, 60 + seed, k=32, with_x0=True) for seed in range(count)]
    on_cpu = _anneal(problems, seed=11, sweeps=sweeps, restarts=restarts, kernel="cpu")
    fused = _anneal(problems, seed=11, sweeps=sweeps, restarts=restarts, kernel="fused")
    cpu_best = np.array([r.kernel_energy.min() for r in on_cpu])
    fused_best = np.array([r.kernel_energy.min() for r in fused])
    starts = np.array([direct_energy(p, p.x0) - p.offset for p in problems])
    assert np.all(fused_best <= starts + 1e-15) and np.all(fused_best < starts)  # every block improved
    gap = (fused_best - cpu_best) / cpu_best
    assert abs(gap.mean()) <= 2e-3
    assert np.mean(gap == 0.0) >= SAME_CHAINS


# ---------------------------------------------------------------------- the parameter and the choice
def test_the_cuda_kernel_parameter_is_declared_and_checked():
    declared = {p.name: p for p in sa.PARAMETERS}
    assert declared["cuda_kernel"].default == "auto" and declared["cuda_kernel"].choices == sa_cuda.KERNELS
    with pytest.raises(UsageError, match="cuda_kernel must be one of auto, fused, graph"):
        solve(pruning_block(8, 0, k=3), "sa", cuda_kernel="cudnn")
    answer = solve(pruning_block(8, 0, k=3), "sa", device="cpu", cuda_kernel="graph", sweeps=5)  # read on CUDA only
    assert "cuda_kernel" not in answer.metadata


def test_which_buckets_run_fused():
    assert sa_cuda.bucket_kernel("auto", 128, False) == "fused"
    assert sa_cuda.bucket_kernel("fused", 128, False) == "fused"
    assert sa_cuda.bucket_kernel("graph", 128, False) == "graph"
    assert sa_cuda.bucket_kernel("fused", 128, True) == "graph"  # factored buckets keep the torch path
    assert sa_cuda.bucket_kernel("auto", sa_triton.MAX_FUSED_VARIABLES + 1, False) == "graph"


# ---------------------------------------------------------------------- CUDA, through solve_batch
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; none is present")


@pytest.mark.cuda
@cuda
def test_cuda_fused_batch_is_feasible_correct_and_reproducible():
    problems = [pruning_block(32, seed, groups=np.arange(32) // 4, counts=[2] * 8, with_x0=True) for seed in range(4)]
    problems += [factored_block(40, 6, 9, k=17), pruning_block(16, 77, k=6), pruning_block(128, 5, k=64)]
    params = dict(seed=2, sweeps=200, device="cuda", cuda_kernel="fused")
    first = solve_batch(problems, "sa", **params)
    second = solve_batch(problems[::-1], "sa", **params)[::-1]
    for problem, a, b in zip(problems, first, second):
        assert np.array_equal(problem.group_sums(a.x), problem.counts)
        assert a.energy == pytest.approx(direct_energy(problem, a.x), rel=1e-9, abs=1e-12)
        assert np.array_equal(a.x, b.x) and a.energy == b.energy
        # a small factored block is annealed in dense form (sa._kernel_form), so by the fused kernel too
        assert a.metadata["cuda_kernel"] == ("graph" if a.metadata["kernel_form"] == "factored" else "fused")
        if problem.x0 is not None:
            assert a.energy <= problem.energy(problem.x0) + 1e-15
    assert first[5].energy == pytest.approx(solve(problems[5], "exhaustive").energy, rel=1e-6)


@pytest.mark.cuda
@cuda
def test_cuda_fused_round_matches_the_cpu_kernel_and_the_graph_path():
    problems = [pruning_block(128, 300 + seed, k=64, with_x0=True) for seed in range(64)]
    params = dict(seed=4, sweeps=64, restarts=2, start="x0")
    on_cpu = solve_batch(problems, "sa", device="cpu", **params)
    fused = solve_batch(problems, "sa", device="cuda", cuda_kernel="fused", **params)
    graph = solve_batch(problems, "sa", device="cuda", cuda_kernel="graph", **params)
    for answers in (fused, graph):
        energies = np.array([a.energy for a in answers])
        reference = np.array([a.energy for a in on_cpu])
        assert abs(np.mean((energies - reference) / np.abs(reference))) <= 2e-3
        assert np.mean([np.array_equal(a.x, b.x) for a, b in zip(answers, on_cpu)]) >= 0.9
    for problem, answer in zip(problems, fused):
        assert problem.is_feasible(answer.x) and answer.energy <= problem.energy(problem.x0) + 1e-15
