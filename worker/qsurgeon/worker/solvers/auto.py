"""``auto``: picks the solver and its effort for each block from its size, constraint and structure.

Why: no one solver is best on every block (docs/solvers.md, "Choosing a solver: auto"). On
the benchmark families at B = 256:

- single-group blocks (layer-wise, causal-LM and outlier rows, Fisher): ``swap-tabu``
  reaches the best known energy where ``sa`` at equal time leaves 0.3–6 %; where the group has
  heavy columns (outlier input channels) and 128 < B ≤ 512, with drop-add moves, 4 × 25,000
  iterations: the best-swap scan is costly there and the search needs many iterations
  (0.071 % mean over 64 outlier blocks where the best swap's default left 0.28 % in 1.4× the
  time, B = 256);
- small groups (N:M, groups of ≤ sa.SMALL_GROUP variables), B ≤ TABU_GROUPS_MAX_VARIABLES:
  ``swap-tabu`` with tenure 4, 4 × 10,000 iterations. At tenure 2 it cycles inside the tiny
  neighbourhoods; at tenure 4 it left 0.27 % mean on 16 4:8 blocks at B = 256 in 84 ms, where
  ``sa`` 8 × 4000 sweeps (+ group polish) left 0.84 % in 236 ms (docs/solvers.md, "N:M blocks").
  Four shorter chains cut the tail that two longer ones leave: over 32 blocks × 6 runs, 4 × 8750
  left 0.31 % mean (worst 3.0 %) where 2 × 17,500 left 0.41 % (worst 8.8 %), and the group scan's
  slot layout made 4 × 10,000 as fast as 2 × 17,500 was (0.26 % over 32 blocks × 2 runs;
  benchmarks/budgets.py);
- small groups, larger B: ``sa``, 8 chains × 4000 sweeps, each chain's best state then
  group-descended (``sa``'s polish). There ``swap-tabu`` falls apart (benchmarks/nm_route.py:
  B = 384 4.1 % against 1.4 %, B = 1024 31 % against 4.5 %) — it stays near the greedy state;
- B ≤ EXACT_MAX_VARIABLES: enumeration is exact and takes milliseconds;
- B > swap-tabu's limit (4096): only ``sa`` runs.

Effort: ``effort="short"`` gives iCBS-sized budgets (the engine's tuned per-solver defaults:
``sa`` 2 × 32 sweeps, ``swap-tabu`` 1 × 50 iterations, ``sa`` 2 × 64 on every N:M block),
``"default"`` the solvers' own defaults (the N:M budgets above), ``"long"`` 4× those. Each sub-batch is solved by
the chosen solver's ``sample_batch``, so answers keep that solver's reproducibility
(same seed, same answer alone or in any batch). The choice is in ``metadata.auto``.

``restarts`` and ``sweeps``, when given, replace the chosen budget's (``sweeps`` is
swap-tabu's iterations; enumeration ignores both): ``auto`` is the default solver of
``qsurgeon solve``, whose ``--restarts``/``--sweeps`` flags must keep meaning something.
"""

from __future__ import annotations

import secrets
from typing import Any, Sequence

from qsurgeon.worker.block.problem import MAX_VARIABLES, BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import BatchSolver, Capabilities, Param, check_params
from qsurgeon.worker.solvers.registry import get_solver
from qsurgeon.worker.solvers.sa import has_small_groups
from qsurgeon.worker.solvers.swap_tabu import has_heavy_columns

#: Blocks up to this many variables are enumerated (2^16 patterns: milliseconds).
EXACT_MAX_VARIABLES = 16
#: Small-grouped (N:M) blocks up to this many variables go to swap-tabu ("swap-tabu-groups"), larger
#: ones to sa ("sa-groups"): measured at B = 64, 128, 256 (tabu as good or better) and 384, 512, 1024
#: (tabu 3–7× worse; benchmarks/nm_route.py, docs/solvers.md).
TABU_GROUPS_MAX_VARIABLES = 256
#: swap-tabu's own limit (a dense float32 Q of 4096² is 64 MiB and one iteration scans it).
TABU_MAX_VARIABLES = 4096
#: Blocks of large groups with heavy columns (rows with outlier input channels, swap_tabu.has_heavy_columns)
#: of more than DROP_ADD_MIN_VARIABLES and at most DROP_ADD_MAX_VARIABLES variables get swap-tabu's drop-add
#: moves ("swap-tabu-heavy"). At B = 256 (64 outlier blocks × 2 runs, benchmarks/budgets.py) 4 × 25,000
#: drop-add iterations left 0.071 % mean in 136–147 ms where the best-swap default 2 × 4000 left 0.28 % in
#: 191–194 ms; at B = 512 (8 blocks) 2.2 % against 9.9 % in 271 ms against 871; at B = 128 both reach the
#: best known and the best swap is the faster. Causal-LM rows have milder heavy columns, take this route too
#: and pay 1.25× the time for the same answers at B = 256 (docs/solvers.md, "Drop-add moves").
DROP_ADD_MIN_VARIABLES = 128
DROP_ADD_MAX_VARIABLES = 512
EFFORTS = ("short", "default", "long")
_SEED_BOUND = 2**127

PARAMETERS = (
    Param("effort", "str", "short: iCBS-sized runs; default: the chosen solver's defaults; long: 4× those",
          "default", choices=EFFORTS),
    Param("start", "str", "passed to the chosen solver (auto: x0 where the problem has one, else greedy)",
          "auto", choices=("auto", "x0", "random", "greedy")),
    Param("restarts", "int", "chains per block of the chosen solver (none: the effort's budget)", minimum=1,
          maximum=4096),
    Param("sweeps", "int", "sa sweeps / swap-tabu iterations per chain (none: the effort's budget)", minimum=0,
          maximum=10**9),
    Param("time_limit", "float", "seconds for each sub-batch (one per chosen solver)", above=0.0),
    Param("seed", "int", "random seed (none: a fresh one, reported in the metadata)",
          minimum=-_SEED_BOUND, maximum=_SEED_BOUND - 1),
)

#: (solver, effort) -> parameters; "-groups": on N:M-like blocks. iCBS's "short" runs keep sa on
#: every N:M block (its masks were tuned and recorded with it).
BUDGETS: dict[tuple[str, str], dict[str, Any]] = {
    ("sa", "short"): {"restarts": 2, "sweeps": 32},
    ("sa", "default"): {},
    ("sa", "long"): {"sweeps": 4000},
    ("sa-groups", "short"): {"restarts": 2, "sweeps": 64},
    ("sa-groups", "default"): {"restarts": 8, "sweeps": 4000},
    ("sa-groups", "long"): {"restarts": 16, "sweeps": 8000},
    ("swap-tabu-groups", "default"): {"restarts": 4, "iterations": 10000, "tenure": 4},
    ("swap-tabu-groups", "long"): {"restarts": 4, "iterations": 40000, "tenure": 4},
    ("swap-tabu", "short"): {"restarts": 1, "iterations": 50},
    ("swap-tabu", "default"): {},
    ("swap-tabu", "long"): {"iterations": 12000},
    ("swap-tabu-heavy", "default"): {"restarts": 4, "iterations": 25000, "move": "drop-add"},
    ("swap-tabu-heavy", "long"): {"restarts": 4, "iterations": 100000, "move": "drop-add"},
    ("exhaustive", "short"): {},
    ("exhaustive", "default"): {},
    ("exhaustive", "long"): {},
}


def choose(problem: BlockProblem, effort: str = "default") -> tuple[str, dict[str, Any]]:
    """The solver name and parameters ``auto`` uses for ``problem`` (see the module docstring)."""
    size = problem.num_variables
    if size <= EXACT_MAX_VARIABLES:
        return "exhaustive", {}
    if has_small_groups(problem):
        if effort != "short" and size <= TABU_GROUPS_MAX_VARIABLES:
            return "swap-tabu", dict(BUDGETS[("swap-tabu-groups", effort)])
        return "sa", dict(BUDGETS[("sa-groups", effort)])
    if size > TABU_MAX_VARIABLES:
        return "sa", dict(BUDGETS[("sa", effort)])
    if effort != "short" and DROP_ADD_MIN_VARIABLES < size <= DROP_ADD_MAX_VARIABLES and has_heavy_columns(problem):
        return "swap-tabu", dict(BUDGETS[("swap-tabu-heavy", effort)])
    return "swap-tabu", dict(BUDGETS[("swap-tabu", effort)])


def _override(name: str, budget: dict[str, Any], given: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """``budget`` with the caller's restarts / sweeps in the chosen solver's own terms."""
    if name == "exhaustive" or not given:
        return name, budget
    budget = dict(budget)
    if "restarts" in given:
        budget["restarts"] = given["restarts"]
    if "sweeps" in given:
        budget.pop("iterations", None)
        budget["iterations" if name == "swap-tabu" else "sweeps"] = given["sweeps"]
    return name, budget


class AutoSolver(BatchSolver):
    """Routes every block to the solver the benchmark tables say suits it."""

    capabilities = Capabilities(
        name="auto",
        description="picks exhaustive, swap-tabu or sa and its effort per block (size, groups)",
        max_variables=MAX_VARIABLES,
        constraints="native",
        device="cpu/cuda",
        deterministic=True,
    )
    parameters = PARAMETERS

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        checked = check_params(PARAMETERS, params, self.name)
        effort = checked.get("effort") or "default"
        start = checked.get("start") or "auto"
        seed = checked.get("seed")
        seed = secrets.randbits(63) if seed is None else seed
        extra = {} if checked.get("time_limit") is None else {"time_limit": checked["time_limit"]}
        given = {name: checked[name] for name in ("restarts", "sweeps") if checked.get(name) is not None}
        plans = [_override(*choose(problem, effort), given) for problem in problems]
        groups: dict[tuple, list[int]] = {}
        for index, (name, budget) in enumerate(plans):
            groups.setdefault((name, tuple(sorted(budget.items()))), []).append(index)
        answers: list[BlockSolution | None] = [None] * len(problems)
        for (name, budget), indices in groups.items():
            call = dict(budget) | {"seed": seed}
            if name in ("sa", "swap-tabu"):
                call |= {"start": start, **extra}
            if name == "sa":
                call["device"] = "cpu"  # the CUDA path pays off for whole rounds only; ask sa for it directly
            for index, answer in zip(indices, get_solver(name).sample_batch([problems[i] for i in indices], **call)):
                metadata = dict(answer.metadata) | {"auto": {"solver": name, "effort": effort, **dict(budget)}}
                answers[index] = BlockSolution(x=answer.x, energy=answer.energy, solver=self.name,
                                               seconds=answer.seconds, sweeps=answer.sweeps, restarts=answer.restarts,
                                               problem_id=answer.problem_id, metadata=metadata)
        return answers  # type: ignore[return-value]
