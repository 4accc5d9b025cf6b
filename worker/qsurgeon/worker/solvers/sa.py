"""``sa``: cardinality-preserving simulated annealing with swap moves (docs/icbs.md §7).

Each chain starts feasible (the problem's x0; without one, the greedy construction +
best-swap descent of :mod:`greedy`; or, when asked, a random assignment with the right
count in every group) and only ever proposes swapping one pruned and one kept variable of
the same group, so every state it visits is feasible. β follows a geometric schedule made
dimensionless by the problem's own energy scale, β = β_rel / median|ΔE| of 256 random
swaps at the start state, because block energies range over orders of magnitude
(1e-4…1e-2) and one absolute schedule cannot fit them all. A sweep is B proposals.

All restarts of all problems of a batch run as independent chains of one vectorised
kernel: numba on the CPU (:mod:`sa_cpu`); on CUDA a fused Triton kernel for dense blocks
(:mod:`sa_triton`) or torch (:mod:`sa_cuda`), by ``cuda_kernel``. A chain's
random numbers depend only on (seed, restart, problem content), so a problem gets the
same answer alone or anywhere in any batch (on the same device). The answer is the best
state any chain of the problem visited, re-scored in float64; on blocks with small groups
(N:M) every chain's best state is first group-descended (``polish``, :mod:`group_descent`),
kept only where that lowers it.
"""

from __future__ import annotations

import functools
import secrets
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from qsurgeon.client.errors import SolverUnavailableError, UsageError
from qsurgeon.worker.block.problem import MAX_VARIABLES, BlockProblem, BlockSolution
from qsurgeon.worker.solvers import group_descent
from qsurgeon.worker.solvers.base import (BatchSolver, Capabilities, Param, check_params, declared_value,
                                          starts_from_x0, time_share)
from qsurgeon.worker.solvers.greedy import greedy_start, swap_deltas
from qsurgeon.worker.solvers.sa_rng import chain_keys, problem_digest

#: β_rel range from x0 and from a random start. Tuned on real MiniLM layer-wise blocks (B = 256,
#: 12 blocks, 4 restarts × 1000 and × 4000 sweeps) and checked on Fisher blocks, B = 1024 and on
#: iCBS-style short runs (32–256 sweeps, B = 128): a schedule that ends at β_rel 300 spends its
#: sweeps where the chain still finds better states. A colder tail (10 → 10000, the former x0
#: default) only re-confirms a frozen state and left a 1.4–2.2× larger gap at equal sweeps; a hotter
#: start (β_rel ≤ 10) wastes sweeps in a disordered phase. The best state seen is kept, so the
#: answer from x0 is never worse than x0.
DEFAULT_BETA_RANGE_X0 = (20.0, 300.0)
DEFAULT_BETA_RANGE_RANDOM = (20.0, 300.0)
#: From the greedy start (a 1-swap local optimum: every ΔE there is ≥ 0) the scale is a low
#: quantile of |ΔE| over random swaps *at that state*, not the median at a random state: rows
#: with outlier input channels make a few swaps 10²× costlier than the rest, and at a random
#: state those inflate every ΔE (through h = Qx), so the median there made the whole schedule
#: hot. Values tuned on the benchmark families (docs/solvers.md, "Robust starts").
DEFAULT_BETA_RANGE_GREEDY = (2.0, 100.0)
#: From the greedy start on a block whose groups are all large (one row of B = 256: layer-wise,
#: outlier, causal and Fisher rows) the schedule starts colder. Measured on those four families at
#: B = 256 from scratch (9 blocks × 6 run seeds each, not the 3 blocks the (2, 100) range was set on;
#: docs/solvers.md, "Robust starts"): β_rel 2 → 100 left 4.7 % mean on outlier rows and 0.65 % on
#: layer-wise blocks; 10 → 100 about 2 % and 0.5 % in half the time (a hot phase accepts many moves,
#: and an accepted move costs O(B)). The hot start only re-randomised the good greedy state of such
#: rows. Blocks with small groups (N:M) keep (2, 100): there a colder start was no better and
#: (5, 300) left a B = 10 grouped block in a 2-swap-deep local minimum.
DEFAULT_BETA_RANGE_GREEDY_LARGE_GROUPS = (10.0, 100.0)
#: A block counts as small-grouped (N:M-like) when its largest group has at most this many variables;
#: ``auto`` routes such blocks to ``sa`` by the same test (:func:`has_small_groups`).
SMALL_GROUP = 32
GREEDY_SCALE_QUANTILE = 0.25
DEFAULT_RESTARTS = 4
#: Without ``sweeps``, a chain gets SWEEPS_PER_VARIABLE sweeps per variable (a larger block is a
#: larger landscape), at most PROPOSALS_PER_CHAIN proposals (so a block's time stays bounded as B
#: grows) and at least DEFAULT_SWEEPS: 1000 at B ≤ 31 and B ≥ 2000, 4096 at B = 128, 7812 at 256,
#: 1953 at 1024 (:func:`default_sweeps`). At B = 256 the former flat 1000 left 1.7 % mean on
#: outlier rows and 1.6 % on 4:8 blocks; 7812 left 0.52–0.77 % and 0.56–0.91 % on two sets of
#: 8–12 blocks each, every family within 1 % (docs/solvers.md, "sa's default length").
SWEEPS_PER_VARIABLE = 32
PROPOSALS_PER_CHAIN = 2_000_000
DEFAULT_SWEEPS = 1000
_STARTS = ("auto", "x0", "random", "greedy")
_DEVICES = ("auto", "cpu", "cuda")
_CUDA_KERNELS = ("auto", "fused", "graph")
_POLISHES = ("group", "none")
_SEED_BOUND = 2**127
#: Every parameter ``sa`` takes: the one declaration that parsing, checks and listings use.
PARAMETERS = (
    Param("restarts", "int", "independent chains per problem", DEFAULT_RESTARTS, minimum=1),
    Param("sweeps", "int", f"sweeps per chain (a sweep = B swap proposals; none: by size, min({SWEEPS_PER_VARIABLE}·B, "
          f"{PROPOSALS_PER_CHAIN:,}/B), at least {DEFAULT_SWEEPS})", minimum=0),
    Param("beta_range", "pair", "(β_rel start, end); none: (20, 300) from x0 or random, from the greedy start "
          f"{DEFAULT_BETA_RANGE_GREEDY} on blocks with small groups (N:M) and "
          f"{DEFAULT_BETA_RANGE_GREEDY_LARGE_GROUPS} on the others"),
    Param("scale_quantile", "float", "quantile of |ΔE| over swaps at the start that makes β dimensionless "
          f"(none: the median of 256 random swaps from x0 or random, {GREEDY_SCALE_QUANTILE} of 1024 from greedy)",
          above=0.0, maximum=1.0),
    Param("time_limit", "float", "seconds for the whole call, checked between chunks of sweeps", above=0.0),
    Param("start", "str", "auto: x0 where the problem has one, else greedy (construction + swap descent)",
          "auto", choices=_STARTS),
    Param("seed", "int", "random seed (none: a fresh one, reported in the metadata)",
          minimum=-_SEED_BOUND, maximum=_SEED_BOUND - 1),
    Param("device", "str", "auto: cuda when available, else cpu", "auto", choices=_DEVICES),
    Param("cuda_kernel", "str", "on CUDA, fused: one Triton kernel per chunk of sweeps (dense blocks; needs triton), "
          "graph: the torch step loop in CUDA graphs, auto: fused where triton is installed", "auto",
          choices=_CUDA_KERNELS),
    Param("polish", "str", "group: group descent (solvers/group_descent.py) from every chain's best state on blocks "
          "with small groups (N:M), kept where it is lower (not after 0 sweeps: the start comes back untouched); "
          "none: the chains' states as they are", "group", choices=_POLISHES),
)


def default_sweeps(num_variables: int) -> int:
    """Sweeps per chain when none are given: see SWEEPS_PER_VARIABLE."""
    return max(DEFAULT_SWEEPS, min(SWEEPS_PER_VARIABLE * num_variables, PROPOSALS_PER_CHAIN // max(num_variables, 1)))


@dataclass(frozen=True)
class AnnealParams:
    """Validated parameters of one ``sa`` call."""

    restarts: int
    sweeps: int | None  # None: by size (default_sweeps), resolved per problem in sample_batch
    beta_range: tuple[float, float] | None  # None: by start (DEFAULT_BETA_RANGE_*)
    scale_quantile: float | None  # None: by start (median from x0/random, GREEDY_SCALE_QUANTILE from greedy)
    time_limit: float | None
    start: str
    seed: int
    device: str  # resolved: "cpu" or "cuda"
    cuda_kernel: str = "auto"  # "auto", "fused" or "graph" (sa_cuda.KERNELS); only read on CUDA
    polish: str = "group"  # "group": group descent from every chain's best state (group_descent.py); "none"

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "AnnealParams":
        checked = check_params(PARAMETERS, params, "sa")
        value = functools.partial(declared_value, PARAMETERS, checked)
        seed = value("seed")
        return cls(restarts=value("restarts"), sweeps=value("sweeps"), beta_range=value("beta_range"),
                   scale_quantile=value("scale_quantile"), time_limit=value("time_limit"), start=value("start"),
                   seed=secrets.randbits(63) if seed is None else seed, device=_resolve_device(value("device")),
                   cuda_kernel=_resolve_cuda_kernel(value("cuda_kernel"), _resolve_device(value("device"))),
                   polish=value("polish"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _resolve_device(device: str) -> str:
    if device not in _DEVICES:
        raise UsageError(f"sa: device must be one of {', '.join(_DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if device == "cuda" and not _cuda_available():
        raise SolverUnavailableError("sa: device 'cuda' was asked for but no CUDA device is available")
    return device


def _resolve_cuda_kernel(kernel: str, device: str) -> str:
    """The ``cuda_kernel`` choice, refused early when "fused" is asked for on CUDA without triton."""
    if kernel == "fused" and device == "cuda":
        from qsurgeon.worker.solvers import sa_triton

        if not sa_triton.available():
            raise SolverUnavailableError("sa: cuda_kernel 'fused' was asked for but triton is not installed")
    return kernel


#: Row of the β table each kind of start follows ("greedy-large": the greedy start on a block
#: without small groups, see :func:`beta_row`).
BETA_ROW = {"random": 0, "x0": 1, "greedy": 2, "greedy-large": 3}


def has_small_groups(problem: BlockProblem) -> bool:
    """True when the block's largest group has at most SMALL_GROUP variables (N:M-like)."""
    return int(np.bincount(problem.group_of, minlength=problem.num_groups).max(initial=0)) <= SMALL_GROUP


def beta_row(problem: BlockProblem, kind: str) -> int:
    """The β-table row a problem's chains follow, by start kind and, from greedy, by group sizes."""
    if kind == "greedy" and not has_small_groups(problem):
        return BETA_ROW["greedy-large"]
    return BETA_ROW[kind]


def _beta_table(params: AnnealParams) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Rows of dimensionless β per sweep: row 0 for random starts, 1 for x0 starts, 2 for greedy ones
    on small-grouped blocks, 3 for greedy ones on the others."""
    ranges = [params.beta_range or DEFAULT_BETA_RANGE_RANDOM, params.beta_range or DEFAULT_BETA_RANGE_X0,
              params.beta_range or DEFAULT_BETA_RANGE_GREEDY,
              params.beta_range or DEFAULT_BETA_RANGE_GREEDY_LARGE_GROUPS]
    sweeps = max(params.sweeps, 1)
    table = np.stack([np.geomspace(low, high, sweeps) for low, high in ranges]).astype(np.float64)
    return np.ascontiguousarray(table[:, : params.sweeps]), ranges


def _digest(problem: BlockProblem) -> bytes:
    if problem.Q is not None:
        Q = np.asarray(problem.Q)
        views = (np.diagonal(Q), Q[0])
    else:
        views = (problem.c, problem.F.sum(axis=0, dtype=np.float32), problem.F[0])
    return problem_digest(problem.group_of, problem.counts, problem.x0, *views)


#: A factored block is annealed in dense form when 8·r ≥ B (a dense ΔE is O(1), a factored one
#: O(r)) and B is at most this (the dense form needs 4·B² bytes).
DENSE_FORM_MAX_VARIABLES = 2048


def _kernel_form(problem: BlockProblem) -> BlockProblem:
    """The form the kernel anneals: a high-rank factored block becomes dense (FᵀF + diag(c)).

    Small Fisher blocks (N = 128 samples, B ≤ 1024) anneal several times faster this way.
    Q is formed in float64, symmetrised exactly, then stored as float32 like any dense block;
    answers are re-scored on the original factored problem.
    """
    rank = problem.rank
    if rank is None or 8 * rank < problem.num_variables or problem.num_variables > DENSE_FORM_MAX_VARIABLES:
        return problem
    F = problem.F.astype(np.float64)
    Q = F.T @ F
    Q = (Q + Q.T) * 0.5
    Q[np.diag_indices_from(Q)] += problem.c.astype(np.float64)
    return BlockProblem(group_of=problem.group_of, counts=problem.counts, Q=Q.astype(np.float32),
                        offset=problem.offset, x0=problem.x0, id=problem.id)


def start_kind(problem: BlockProblem, start: str, solver: str) -> str:
    """"x0", "random" or "greedy": where a problem's chains start under the ``start`` parameter.

    "auto" is x0 when the problem has one, else the greedy construction (never a random
    state: on blocks with outlier channels a random start costs 15–50 % of energy).
    """
    if start == "greedy":
        return "greedy"
    if start == "auto" and problem.x0 is None:
        return "greedy"
    return "x0" if starts_from_x0(problem, start, solver) else "random"


def robust_scale(deltas: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the non-zero |ΔE|; falls back to their mean, then 1, when none is positive."""
    magnitudes = np.abs(np.asarray(deltas, np.float64))
    magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.size == 0:
        return 1.0
    value = float(np.quantile(magnitudes, quantile))
    return value if value > 0 else float(magnitudes.mean())


def _random_state(problem: BlockProblem, key: np.uint64) -> np.ndarray:
    """A random feasible state (for a scale_quantile asked for with random starts; not the chain's own)."""
    rng = np.random.default_rng(int(key))
    x = np.zeros(problem.num_variables, np.uint8)
    for members, count in zip(problem.group_members(), problem.counts):
        x[rng.choice(members, size=int(count), replace=False)] = 1
    return x


def polish_chains(problem: BlockProblem, states: np.ndarray, polish: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(states, float64 energies, gain) after the ``polish`` of every chain's best state.

    "group": group descent (:func:`group_descent.polish_states`) on blocks with small groups;
    a row it does not lower is kept as it was, so no answer gets worse. gain = lowest energy
    before − lowest after (≥ 0; 0 where nothing applies or polish is "none").
    """
    before = problem.energies(states)
    if polish != "group" or not group_descent.applies(problem):
        return states, before, 0.0
    polished = group_descent.polish_states(problem, states)
    after = problem.energies(polished)
    return polished, after, float(before.min() - after.min())


class SimulatedAnnealingSolver(BatchSolver):
    """Swap-move annealing that never leaves the feasible set; vectorised over a batch."""

    capabilities = Capabilities(
        name="sa",
        description="cardinality-preserving simulated annealing with swap moves (CPU kernel or CUDA)",
        max_variables=MAX_VARIABLES,
        constraints="native",
        device="cpu/cuda",
        deterministic=True,
    )
    parameters = PARAMETERS

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Anneal every problem; parameters (all optional, declared in PARAMETERS):

        restarts (4), sweeps (by size, :func:`default_sweeps`; a sweep = B proposals), beta_range ((β_rel start, end);
        default (20, 300) from either start), time_limit (seconds for
        the whole call, checked between chunks of sweeps; the best so far is returned),
        scale_quantile (the |ΔE| quantile behind β; default by start),
        start ("auto": x0 where the problem has one, else "greedy"; "x0"; "random"; "greedy":
        the construction + swap descent of :mod:`greedy`, from which the run can only improve),
        seed (None: a fresh random seed, reported in the metadata), device ("auto", "cpu",
        "cuda"), cuda_kernel ("auto", "fused": the Triton kernel of :mod:`sa_triton` for dense
        blocks, "graph": the torch step loop of :mod:`sa_cuda`; read on CUDA only), polish
        ("group": group descent of :mod:`group_descent` from every chain's best state on
        blocks with small groups, kept where lower; "none").
        """
        options = AnnealParams.parse(params)
        problems = list(problems)
        if options.sweeps is not None:
            return self._anneal(problems, options)
        # by size: each problem's length depends on its own B, so its answer does not depend on its batch
        lengths: dict[int, list[int]] = {}
        for index, problem in enumerate(problems):
            lengths.setdefault(default_sweeps(problem.num_variables), []).append(index)
        parts = list(lengths.items())
        work = [sweeps * sum(problems[i].num_variables for i in indices) for sweeps, indices in parts]
        answers: list[BlockSolution | None] = [None] * len(problems)
        started = time.perf_counter()
        for position, (sweeps, indices) in enumerate(parts):
            limit = time_share(options.time_limit, started, work, position)
            part = replace(options, sweeps=sweeps, time_limit=None if limit is None else max(limit, 1e-3))
            for index, answer in zip(indices, self._anneal([problems[i] for i in indices], part)):
                answers[index] = answer
        return answers  # type: ignore[return-value]

    def _anneal(self, problems: list[BlockProblem], options: AnnealParams) -> list[BlockSolution]:
        """:meth:`sample_batch` with the sweeps settled."""
        if not problems:
            return []
        started = time.perf_counter()
        starts = [start_kind(problem, options.start, self.name) for problem in problems]
        keys = np.stack([chain_keys(_digest(problem), options.seed, options.restarts) for problem in problems])
        betas, ranges = _beta_table(options)
        beta_rows = np.array([beta_row(problem, kind) for problem, kind in zip(problems, starts)], np.int64)
        kernel_problems, scales = [], np.full(len(problems), np.nan)
        for index, (problem, kind) in enumerate(zip(problems, starts)):
            if kind == "greedy":  # the kernel starts from the constructed state as from an x0
                x = greedy_start(problem)
                problem = problem.with_x0(x)
                quantile = options.scale_quantile or GREEDY_SCALE_QUANTILE
                scales[index] = robust_scale(swap_deltas(problem, x), quantile)
            elif options.scale_quantile is not None:
                scales[index] = robust_scale(swap_deltas(problem, problem.x0 if kind == "x0" else
                                                         _random_state(problem, keys[index, 0, 0])),
                                             options.scale_quantile)
            kernel_problems.append(_kernel_form(problem))
        use_x0 = np.array([kind != "random" for kind in starts], np.bool_)
        if options.device == "cuda":
            from qsurgeon.worker.solvers import sa_cuda

            results = sa_cuda.run_batch(kernel_problems, keys, use_x0, beta_rows, betas, options.time_limit,
                                        device="cuda", scales=scales, kernel=options.cuda_kernel)
        else:
            from qsurgeon.worker.solvers import sa_cpu

            results = sa_cpu.run_batch(kernel_problems, keys, use_x0, beta_rows, betas, options.time_limit,
                                       scales=scales)
        elapsed = time.perf_counter() - started
        kernels: list[dict[str, str]] = [{} for _ in problems]  # metadata: which CUDA kernel annealed each
        if options.device == "cuda":
            kernels = [{"cuda_kernel": sa_cuda.bucket_kernel(options.cuda_kernel, p.num_variables, p.is_factored)}
                       for p in kernel_problems]
        solutions = []
        for problem, kernel_problem, result, kind, kernel, row in zip(problems, kernel_problems, results, starts,
                                                                      kernels, beta_rows):
            states, energies, gain = polish_chains(problem, result.best_x, options.polish if options.sweeps else "none")
            best = int(np.argmin(energies))
            proposals = result.sweeps_done * problem.num_variables * options.restarts
            solutions.append(BlockSolution(
                x=states[best].astype(np.uint8),
                energy=float(energies[best]),
                solver=self.name,
                seconds=elapsed / len(problems),
                sweeps=result.sweeps_done,
                restarts=options.restarts,
                problem_id=problem.id,
                metadata={
                    "device": options.device,
                    **kernel,
                    "kernel_form": "factored" if kernel_problem.is_factored else "dense",
                    "seed": options.seed,
                    "start": kind,
                    "beta_range": list(ranges[int(row)]),
                    "energy_scale": statistics.median(result.scale.tolist()),
                    "acceptance_rate": float(result.accepted.sum() / proposals) if proposals else 0.0,
                    "best_restart": best,
                    "polish": options.polish,
                    "polish_gain": gain,
                    "sweeps_requested": options.sweeps,
                    "stopped_by_time_limit": result.sweeps_done < options.sweeps,
                    "batch_size": len(problems),
                    "batch_seconds": elapsed,
                },
            ))
        return solutions
