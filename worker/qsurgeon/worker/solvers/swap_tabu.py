"""``swap-tabu``: best-improvement swap tabu search for cardinality/group-constrained QUBOs.

Why a second local-search solver next to ``sa``: real layer-wise blocks of B = 256 are
glassy, and single-swap annealing needs ~10⁷–10⁸ proposals to come within 0.1 % of the best
known energy. Tabu search looks at *every* swap of one kept and one pruned variable of a
group at each step (O(1) each from cached fields, ΔE(i in, j out) = d_i + d_j − 2Q_ij),
takes the best one that is not tabu (or that beats the best state so far), and forbids
the two variables to move back for a few iterations, so it walks through the low plateaus
of such landscapes instead of sampling them. With ``move="drop-add"`` an iteration takes the
cheapest drop and then the best add given it instead (O(B) in place of the whole
neighbourhood): on rows with outlier input channels, where the full scan is costly and the
search needs many iterations, that buys ~17× the iterations for the same time.

Every chain starts feasible (x0; without one, the greedy construction + best-swap descent
of :mod:`greedy`; or a random assignment with the right count in every group, when asked) and only swaps inside a group, so counts stay exact. Factored blocks are searched
in dense form (Q = FᵀF + diag(c) formed in float64, stored as float32 like a dense block),
which is why the solver accepts at most :data:`MAX_VARIABLES` variables: one iteration
costs O(Σ_g ones_g · size_g), i.e. O(B²) for a single group. A chain's tenures come from
its key, which depends only on (seed, restart, problem content), so a problem gets the
same answer alone or anywhere in any batch; the answer is the best state of any restart,
re-scored in float64 on the original problem. Blocks whose largest group has more than 512
variables are first annealed with ``sa`` (``anneal_sweeps``) and searched from its answer.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers import swap_tabu_cpu
from qsurgeon.worker.solvers.base import BatchSolver, Capabilities, Param, check_params, declared_value
from qsurgeon.worker.solvers.greedy import greedy_start
from qsurgeon.worker.solvers.sa import polish_chains, start_kind
from qsurgeon.worker.solvers.sa_rng import chain_keys, problem_digest

#: Largest block accepted: a dense float32 Q of 4096² is 64 MiB, and one iteration scans it.
MAX_VARIABLES = 4096
DEFAULT_RESTARTS = 2
#: 2 × 4000 at B = 256: outlier rows 0.38 % mean gap in 83 ms where 2 × 3000 left 0.56 % in 63 ms
#: (8 blocks × 2 seeds; layer-wise and causal rows equal). A chain's first N iterations do not depend
#: on how many follow, so more can only lower the answer; the cost is time (docs/solvers.md).
DEFAULT_ITERATIONS = 4000
#: Tuned on real MiniLM layer-wise blocks (B = 256, 6 blocks × 4 seeds): tenure 2 (a moved
#: variable is tabu for 2–4 iterations) reached the best known energy far more often than 1
#: (cycles) or ≥ 3 (forbids too many of the few good moves of a deep valley); see docs/solvers.md.
DEFAULT_TENURE = 2
#: Without an explicit anneal_sweeps, a problem whose largest group exceeds this many variables is
#: annealed first (DEFAULT_ANNEAL_SWEEPS of ``sa``): from x0, one best swap per O(B²) iteration
#: descends too slowly there. At B = 1024 (both families, 3 blocks each) ``sa`` then 1000 iterations
#: beat ``sa`` alone and the search from x0 (docs/solvers.md); at B = 256 the search alone is best.
AUTO_ANNEAL_ABOVE = 512
#: Kicks (iterated tabu search, swap_tabu_cpu._kick): after DEFAULT_STALL iterations without a
#: new best state, go back to the best one and make B // KICK_DIVISOR (at least 2) random swaps.
#: Scanned on the five benchmark families at B = 256 from scratch (benchmarks/tune_kicks.py,
#: docs/solvers.md): stall 100 / 16 swaps took outlier rows from 1.8 % to 0.04 % mean gap and
#: N:M from 6.7 % to 1.7 %, layer-wise / Fisher / causal stayed at the best known; weaker kicks
#: (2–6 swaps) re-entered the same valley, later ones (stall 250–400) kicked too rarely. A run
#: shorter than the stall (iCBS: 1 × 50 iterations from x0) never kicks: its answers are unchanged.
DEFAULT_STALL = 100
KICK_DIVISOR = 16
#: At B = 1024 the anneal's length, not the search's, sets the answer: benchmarks/anneal_first.py on
#: layer-wise, Fisher, outlier and causal rows (4 blocks × 2 seeds each) took the mean gap from
#: 12 / 0.52 / 7.4 / 3.7 % (1000 sweeps) to 2.6 / 0.17 / 1.5 / 1.4 % (8000) in 1.4–1.9× the time;
#: longer anneals kept gaining on layer-wise rows only (docs/solvers.md, "Large blocks").
DEFAULT_ANNEAL_SWEEPS = 8000
_STARTS = ("auto", "x0", "random", "greedy")


@dataclass(frozen=True)
class MoveDefaults:
    """A move's code in the kernel, and what a search with it uses where the call does not say (tuned per move)."""

    code: int  # swap_tabu_cpu.MOVE_BEST or MOVE_DROP_ADD
    tenure: int
    stall: int
    kick_divisor: int  # a kick makes B // kick_divisor random swaps (at least 2) ...
    kick_most: int | None = None  # ... and at most this many


#: Per move, by the name ``move`` takes: "best" as tuned above; "drop-add" (swap_tabu_cpu._drop_add)
#: tuned on 32 outlier rows at B = 256 (benchmarks/budgets.py, 4 × 25,000 iterations, docs/solvers.md
#: "Drop-add moves"): tenure 3 / stall 400 / 8 swaps left 0.11 % mean where stall 100–200 (kicked
#: before the cheap moves had searched a valley) or 16–24 swaps (a new start each time) left 0.16–0.8 %,
#: and tenure 2 or 5 0.14–0.19 %; at B = 512 kicks of 16 swaps left 5.9 % where 8 left 2.2 %, hence the cap.
MOVE_DEFAULTS = {
    "best": MoveDefaults(swap_tabu_cpu.MOVE_BEST, tenure=DEFAULT_TENURE, stall=DEFAULT_STALL,
                         kick_divisor=KICK_DIVISOR),
    "drop-add": MoveDefaults(swap_tabu_cpu.MOVE_DROP_ADD, tenure=3, stall=400, kick_divisor=32, kick_most=8),
}
_MAX_ITERATIONS = 10**9
_SEED_BOUND = 2**127
#: Every parameter ``swap-tabu`` takes: the one declaration that parsing, checks and listings use.
#: "sweeps" is another name for "iterations", so ``qsurgeon solve --sweeps N`` works.
PARAMETERS = (
    Param("restarts", "int", "independent searches per problem, run in parallel", DEFAULT_RESTARTS,
          minimum=1, maximum=4096),
    Param("iterations", "int", "moves (swaps) per restart", DEFAULT_ITERATIONS, minimum=0, maximum=_MAX_ITERATIONS),
    Param("move", "str", "best: the best allowed swap of the whole neighbourhood, O(B²) per iteration at worst; "
          "drop-add: the cheapest drop, then the best add given it, O(B) (auto's choice on rows with outlier "
          "channels)", "best", choices=tuple(MOVE_DEFAULTS)),
    Param("sweeps", "int", "another name for iterations", minimum=0, maximum=_MAX_ITERATIONS),
    Param("tenure", "int", "a moved variable is tabu for tenure + U[0, tenure] iterations (none: "
          + ", ".join(f"{value.tenure} for move {name}" for name, value in MOVE_DEFAULTS.items()) + ")",
          minimum=0, maximum=1_000_000),
    Param("stall", "int", "iterations without a new best state before a kick (0: never kick; none: "
          + ", ".join(f"{value.stall} for move {name}" for name, value in MOVE_DEFAULTS.items()) + ")",
          minimum=0, maximum=_MAX_ITERATIONS),
    Param("kick", "int", "random swaps of a kick, made from the best state seen (none: "
          + ", ".join(f"B/{value.kick_divisor}" + (f" up to {value.kick_most}" if value.kick_most else "")
                      + f" for move {name}" for name, value in MOVE_DEFAULTS.items())
          + ", at least 2)", minimum=1, maximum=1_000_000),
    Param("anneal_sweeps", "int", f"sa sweeps first (none: {DEFAULT_ANNEAL_SWEEPS} when a group has more than "
          f"{AUTO_ANNEAL_ABOVE} variables, else 0)", minimum=0, maximum=_MAX_ITERATIONS),
    Param("time_limit", "float", "seconds for the whole call, checked between chunks of iterations", above=0.0),
    Param("start", "str", "auto: x0 where the problem has one, else greedy (construction + swap descent)",
          "auto", choices=_STARTS),
    Param("seed", "int", "random seed (none: a fresh one, reported in the metadata)",
          minimum=-_SEED_BOUND, maximum=_SEED_BOUND - 1),
    Param("polish", "str", "group: group descent (solvers/group_descent.py) from every restart's best state on "
          "blocks with small groups (N:M), kept where it is lower (not after 0 iterations: the start comes back "
          "untouched); none (default: at its defaults the search's best states were already group optima on every "
          "4:8 benchmark block, docs/solvers.md): the states as they are", "none", choices=("group", "none")),
)


@dataclass(frozen=True)
class TabuParams:
    """Validated parameters of one ``swap-tabu`` call."""

    restarts: int
    iterations: int
    tenure: int
    stall: int
    kick: int | None  # None: by size (kick_swaps)
    anneal_sweeps: int | None  # > 0: ``sa`` with this many sweeps first; None: by size (sweeps_to_anneal)
    time_limit: float | None
    start: str
    seed: int
    polish: str = "none"
    move: str = "best"

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "TabuParams":
        checked = check_params(PARAMETERS, params, "swap-tabu")
        if checked.get("iterations") is not None and checked.get("sweeps") is not None:
            raise UsageError("swap-tabu: give iterations or sweeps (the same thing here), not both")
        if checked.get("iterations") is None and checked.get("sweeps") is not None:
            checked["iterations"] = checked["sweeps"]
        value = functools.partial(declared_value, PARAMETERS, checked)
        seed = value("seed")
        tuned = MOVE_DEFAULTS[value("move")]
        tenure, stall = value("tenure"), value("stall")
        return cls(restarts=value("restarts"), iterations=value("iterations"),
                   tenure=tuned.tenure if tenure is None else tenure, stall=tuned.stall if stall is None else stall,
                   kick=value("kick"), anneal_sweeps=value("anneal_sweeps"),
                   time_limit=value("time_limit"), start=value("start"),
                   seed=secrets.randbits(63) if seed is None else seed, polish=value("polish"),
                   move=value("move"))


def kick_swaps(problem: BlockProblem, kick: int | None, move: str = "best") -> int:
    """Random swaps of one kick: as asked, or B / the move's kick_divisor (at least 2, at most its kick_most)."""
    if kick is not None:
        return kick
    tuned = MOVE_DEFAULTS[move]
    return max(2, min(problem.num_variables // tuned.kick_divisor, tuned.kick_most or problem.num_variables))


def has_heavy_columns(problem: BlockProblem) -> bool:
    """Whether some group of more than swap_tabu_cpu.SMALL_GROUP variables has heavy columns (outlier input
    channels: entries several times the rest, swap_tabu_cpu.heavy_columns): ``auto`` gives such blocks drop-add
    moves."""
    Q = problem.dense_Q()
    for members in problem.group_members():
        if len(members) > swap_tabu_cpu.SMALL_GROUP:
            block = Q[np.ix_(members, members)]
            np.fill_diagonal(block, -np.inf)
            if len(swap_tabu_cpu.heavy_columns(block)):
                return True
    return False


def sweeps_to_anneal(problem: BlockProblem, anneal_sweeps: int | None) -> int:
    """``sa`` sweeps to run before the search: as asked, or by the size of the largest group."""
    if anneal_sweeps is not None:
        return anneal_sweeps
    largest = int(np.bincount(problem.group_of, minlength=problem.num_groups).max(initial=0))
    return DEFAULT_ANNEAL_SWEEPS if largest > AUTO_ANNEAL_ABOVE else 0


def dense_kernel_Q(problem: BlockProblem) -> np.ndarray:
    """The float32 Q the kernel searches; a factored block's FᵀF + diag(c) is formed in float64.

    Symmetrised like :meth:`BlockProblem.dense` does, so a factored block and the dense block
    built from its ``dense_Q()`` give the kernel the very same matrix (and the same answer).
    """
    if problem.Q is not None:
        return np.asarray(problem.Q, np.float32)
    Q = problem.dense_Q().astype(np.float32)
    return np.ascontiguousarray((Q + Q.T) * np.float32(0.5))


def _keys(problem: BlockProblem, Q: np.ndarray, seed: int, restarts: int) -> np.ndarray:
    """Chain keys from (seed, restart, content of the kernel's Q and the constraint)."""
    digest = problem_digest(problem.group_of, problem.counts, problem.x0, np.diagonal(Q), Q[0])
    return chain_keys(b"swap-tabu" + digest, seed, restarts)


class SwapTabuSolver(BatchSolver):
    """Tabu search over swaps inside groups; never leaves the feasible set."""

    capabilities = Capabilities(
        name="swap-tabu",
        description="swap tabu search inside groups (best swap or drop-add; CPU kernel; dense or factored, B ≤ 4096)",
        max_variables=MAX_VARIABLES,
        constraints="native",
        device="cpu",
        deterministic=True,
    )
    parameters = PARAMETERS

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Search every problem; parameters (all optional):

        restarts (DEFAULT_RESTARTS; independent searches per problem, run in parallel), iterations
        (DEFAULT_ITERATIONS per restart; one iteration = one swap), move ("best": the best swap over
        the whole neighbourhood; "drop-add": the cheapest drop, then the best add given it), tenure
        (a variable that moved is tabu for tenure + U[0, tenure] iterations), stall / kick (a kick
        of ``kick`` random swaps from the best state after ``stall`` iterations without a new best;
        tenure, stall and kick default to MOVE_DEFAULTS[move]), anneal_sweeps (when > 0, ``sa``
        with this many sweeps and the same restarts and seed runs first on the CPU and the search
        starts from its answer; 0: never; None: DEFAULT_ANNEAL_SWEEPS for problems whose largest
        group has more than AUTO_ANNEAL_ABOVE variables, where descending from x0 one best swap per
        O(B²) iteration is slow, else 0), time_limit (seconds for the whole call, checked between
        chunks of iterations; the best so far is returned), start ("auto": x0 where the problem has
        one, else "greedy"; "x0"; "random"; "greedy"), seed (None: fresh, reported in the
        metadata), polish ("group": group descent from every restart's best state on blocks with
        small groups, kept where lower; "none", the default: it gained nothing on the 4:8 families).
        """
        options = TabuParams.parse(params)
        problems = list(problems)
        if not problems:
            return []
        started = time.perf_counter()
        kinds = [start_kind(problem, options.start, self.name) for problem in problems]
        use_x0 = np.array([kind != "random" for kind in kinds], np.bool_)
        annealed: list[BlockSolution | None] = [None] * len(problems)
        sweeps = [sweeps_to_anneal(problem, options.anneal_sweeps) for problem in problems]
        for count in sorted(set(sweeps) - {0}):  # sa's answers do not depend on the batch
            chosen = [index for index, value in enumerate(sweeps) if value == count]
            for index, answer in zip(chosen, self._anneal([problems[i] for i in chosen], count, options)):
                annealed[index] = answer
                use_x0[index] = True
        deadline = None if options.time_limit is None else started + options.time_limit
        starts = [problem.with_x0(answer.x) if answer is not None
                  else problem.with_x0(greedy_start(problem)) if kind == "greedy" else problem
                  for problem, answer, kind in zip(problems, annealed, kinds)]
        results = self._search(starts, use_x0, options, deadline)
        elapsed = time.perf_counter() - started
        return [self._solution(problem, result, kind, answer, options, elapsed, len(problems))
                for problem, result, kind, answer in zip(problems, results, kinds, annealed)]

    @staticmethod
    def _anneal(problems: list[BlockProblem], sweeps: int, options: TabuParams) -> list[BlockSolution]:
        from qsurgeon.worker.solvers.sa import SimulatedAnnealingSolver

        extra = {} if options.time_limit is None else {"time_limit": options.time_limit}
        return SimulatedAnnealingSolver().sample_batch(problems, restarts=options.restarts, sweeps=sweeps,
                                                       seed=options.seed, start=options.start, device="cpu", **extra)

    @staticmethod
    def _search(problems: list[BlockProblem], use_x0: np.ndarray, options: TabuParams,
                deadline: float | None) -> list:
        kernel_problems, keys = [], []
        for problem in problems:
            Q = dense_kernel_Q(problem)
            keys.append(_keys(problem, Q, options.seed, options.restarts))
            kernel_problems.append(swap_tabu_cpu.kernel_problem(
                Q, problem.group_of, problem.counts, problem.x0, (options.tenure, options.tenure, options.tenure),
                (options.stall, kick_swaps(problem, options.kick, options.move)),
                MOVE_DEFAULTS[options.move].code))
        # the time limit covers forming the dense matrices too (seconds at B = 4096)
        time_limit = None if deadline is None else max(deadline - time.perf_counter(), 1e-6)
        return swap_tabu_cpu.run_batch(kernel_problems, np.stack(keys), use_x0, options.iterations, time_limit)

    def _solution(self, problem: BlockProblem, result: Any, kind: str, annealed: BlockSolution | None,
                  options: TabuParams, elapsed: float, batch_size: int) -> BlockSolution:
        states, energies, gain = polish_chains(problem, result.best_x, options.polish if options.iterations else "none")
        best = int(np.argmin(energies))
        metadata = {
            "device": "cpu",
            "seed": options.seed,
            "start": ("sa" if annealed is not None else kind),
            "tenure": options.tenure,
            "move": options.move,
            "stall": options.stall,
            "kick": kick_swaps(problem, options.kick, options.move),
            "iterations": result.iterations_done,
            "iterations_requested": options.iterations,
            "moves": int(result.moves.sum()),
            "best_restart": best,
            "polish": options.polish,
            "polish_gain": gain,
            "stopped_by_time_limit": result.iterations_done < options.iterations,
            "batch_size": batch_size,
            "batch_seconds": elapsed,
        }
        if annealed is not None:
            metadata.update(anneal_sweeps=annealed.sweeps, anneal_energy=annealed.energy)
        return BlockSolution(
            x=states[best].astype(np.uint8), energy=float(energies[best]), solver=self.name,
            seconds=elapsed / batch_size, sweeps=result.iterations_done, restarts=options.restarts,
            problem_id=problem.id, metadata=metadata,
        )
