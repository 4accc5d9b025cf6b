"""``sa``: cardinality-preserving simulated annealing with swap moves (docs/icbs.md §7).

Each chain starts feasible (the problem's x0, or a random assignment with the right count
in every group) and only ever proposes swapping one pruned and one kept variable of the
same group, so every state it visits is feasible. β follows a geometric schedule made
dimensionless by the problem's own energy scale, β = β_rel / median|ΔE| of 256 random
swaps at the start state, because block energies range over orders of magnitude
(1e-4…1e-2) and one absolute schedule cannot fit them all. A sweep is B proposals.

All restarts of all problems of a batch run as independent chains of one vectorised
kernel: numba on the CPU (:mod:`sa_cpu`), torch on CUDA (:mod:`sa_cuda`). A chain's
random numbers depend only on (seed, restart, problem content), so a problem gets the
same answer alone or anywhere in any batch (on the same device). The answer is the best
state any chain of the problem visited, re-scored in float64.
"""

from __future__ import annotations

import functools
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qsurgeon.client.errors import SolverUnavailableError, UsageError
from qsurgeon.worker.block.problem import MAX_VARIABLES, BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import Capabilities, Param, Solver, check_params, declared_value, starts_from_x0
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
DEFAULT_RESTARTS = 4
DEFAULT_SWEEPS = 1000
_STARTS = ("auto", "x0", "random")
_DEVICES = ("auto", "cpu", "cuda")
_SEED_BOUND = 2**127
#: Every parameter ``sa`` takes: the one declaration that parsing, checks and listings use.
PARAMETERS = (
    Param("restarts", "int", "independent chains per problem", DEFAULT_RESTARTS, minimum=1),
    Param("sweeps", "int", "sweeps per chain (a sweep = B swap proposals)", DEFAULT_SWEEPS, minimum=0),
    Param("beta_range", "pair", "(β_rel start, end); none: (20, 300) from either start"),
    Param("time_limit", "float", "seconds for the whole call, checked between chunks of sweeps", above=0.0),
    Param("start", "str", "auto: x0 where the problem has one, else random", "auto", choices=_STARTS),
    Param("seed", "int", "random seed (none: a fresh one, reported in the metadata)",
          minimum=-_SEED_BOUND, maximum=_SEED_BOUND - 1),
    Param("device", "str", "auto: cuda when available, else cpu", "auto", choices=_DEVICES),
)


@dataclass(frozen=True)
class AnnealParams:
    """Validated parameters of one ``sa`` call."""

    restarts: int
    sweeps: int
    beta_range: tuple[float, float] | None  # None: by start (DEFAULT_BETA_RANGE_*)
    time_limit: float | None
    start: str
    seed: int
    device: str  # resolved: "cpu" or "cuda"

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "AnnealParams":
        checked = check_params(PARAMETERS, params, "sa")
        value = functools.partial(declared_value, PARAMETERS, checked)
        seed = value("seed")
        return cls(restarts=value("restarts"), sweeps=value("sweeps"), beta_range=value("beta_range"),
                   time_limit=value("time_limit"), start=value("start"),
                   seed=secrets.randbits(63) if seed is None else seed, device=_resolve_device(value("device")))


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


def _beta_table(params: AnnealParams) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Rows of dimensionless β per sweep: row 0 for random starts, row 1 for x0 starts."""
    ranges = [params.beta_range or DEFAULT_BETA_RANGE_RANDOM, params.beta_range or DEFAULT_BETA_RANGE_X0]
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


class SimulatedAnnealingSolver(Solver):
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

    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        return self.sample_batch([problem], **params)[0]

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Anneal every problem; parameters (all optional, declared in PARAMETERS):

        restarts (4), sweeps (1000; a sweep = B proposals), beta_range ((β_rel start, end);
        default (20, 300) from either start), time_limit (seconds for
        the whole call, checked between chunks of sweeps; the best so far is returned),
        start ("auto": x0 where the problem has one, else random; "x0"; "random"),
        seed (None: a fresh random seed, reported in the metadata), device ("auto", "cpu",
        "cuda").
        """
        options = AnnealParams.parse(params)
        problems = list(problems)
        if not problems:
            return []
        started = time.perf_counter()
        use_x0 = np.array([starts_from_x0(problem, options.start, self.name) for problem in problems], np.bool_)
        keys = np.stack([chain_keys(_digest(problem), options.seed, options.restarts) for problem in problems])
        betas, ranges = _beta_table(options)
        beta_rows = use_x0.astype(np.int64)
        kernel_problems = [_kernel_form(problem) for problem in problems]
        if options.device == "cuda":
            from qsurgeon.worker.solvers import sa_cuda

            results = sa_cuda.run_batch(kernel_problems, keys, use_x0, beta_rows, betas, options.time_limit, device="cuda")
        else:
            from qsurgeon.worker.solvers import sa_cpu

            results = sa_cpu.run_batch(kernel_problems, keys, use_x0, beta_rows, betas, options.time_limit)
        elapsed = time.perf_counter() - started
        solutions = []
        for problem, kernel_problem, result, from_x0 in zip(problems, kernel_problems, results, use_x0):
            energies = problem.energies(result.best_x)
            best = int(np.argmin(energies))
            proposals = result.sweeps_done * problem.num_variables * options.restarts
            solutions.append(BlockSolution(
                x=result.best_x[best].astype(np.uint8),
                energy=float(energies[best]),
                solver=self.name,
                seconds=elapsed / len(problems),
                sweeps=result.sweeps_done,
                restarts=options.restarts,
                problem_id=problem.id,
                metadata={
                    "device": options.device,
                    "kernel_form": "factored" if kernel_problem.is_factored else "dense",
                    "seed": options.seed,
                    "start": "x0" if from_x0 else "random",
                    "beta_range": list(ranges[int(from_x0)]),
                    "energy_scale": statistics.median(result.scale.tolist()),
                    "acceptance_rate": float(result.accepted.sum() / proposals) if proposals else 0.0,
                    "best_restart": best,
                    "sweeps_requested": options.sweeps,
                    "stopped_by_time_limit": result.sweeps_done < options.sweeps,
                    "batch_size": len(problems),
                    "batch_seconds": elapsed,
                },
            ))
        return solutions
