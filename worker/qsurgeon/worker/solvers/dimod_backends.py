"""D-Wave's dimod samplers as block solvers: penalty in, repaired answer out.

Any ``dimod.Sampler`` (D-Wave's classical samplers, a user's own, or a Leap/QPU sampler
wrapped in an embedding composite) answers a block through :class:`DimodSamplerSolver`:

1. the block becomes a ``dimod.BinaryQuadraticModel`` of the penalised objective
   (:mod:`~qsurgeon.worker.solvers.penalty`; factored problems are expanded to a dense
   Q, so B ≤ ``MAX_DENSE_VARIABLES`` = 2048),
2. the sampler samples it,
3. every read is checked and repaired to exact counts by greedy cheapest flips, energies
   are recomputed in float64 and the best feasible answer is returned, with the raw
   feasibility rate (before repair) and the penalty in the metadata.

qsurgeon's generic parameters map onto the sampler's: ``restarts`` -> ``num_reads``,
``sweeps`` -> ``num_sweeps``, ``seed`` -> ``seed`` (dropped for samplers without one),
``alpha`` sets the penalty (see penalty.py); any other parameter is passed through when
the sampler declares it in ``sampler.parameters`` and refused otherwise.
"""

from __future__ import annotations

import math
import time
from typing import Any

import dimod
import numpy as np
from dwave.samplers import SimulatedAnnealingSampler, SteepestDescentSolver as _DWaveSteepestDescent, TabuSampler

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import Capabilities, Param, Solver, check_params
from qsurgeon.worker.solvers.penalty import MAX_DENSE_VARIABLES, PenaltyModel

#: Caps on what one call may ask for: D-Wave's samplers allocate every read (and the SA
#: schedule every sweep) up front, so an absurd request would exhaust memory, not time.
MAX_READS = 10_000
MAX_SWEEPS = 1_000_000
#: exact-dimod enumerates 2^B states (2^20 × 20 bytes of samples).
MAX_EXACT_VARIABLES = 20

_GENERIC_NAMES = {"restarts": "num_reads", "sweeps": "num_sweeps"}


def penalised_bqm(model: PenaltyModel) -> dimod.BinaryQuadraticModel:
    """The penalised, scaled objective as a binary BQM over variables 0..B−1."""
    matrix, offset = model.penalised_qubo()
    bqm = dimod.BinaryQuadraticModel(matrix, dimod.BINARY)
    bqm.offset = offset
    return bqm


def samples_as_array(sampleset: dimod.SampleSet, num_variables: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads as an (n, B) 0/1 array in variable order 0..B−1, and their occurrence counts.

    Samplers may return variables in any order and in SPIN form; both are undone here.
    """
    labels = list(sampleset.variables)
    position = {label: column for column, label in enumerate(labels)}
    missing = [index for index in range(num_variables) if index not in position]
    if missing:
        raise UsageError(f"the sampler's answer lacks variable {missing[0]} ({len(missing)} missing)")
    columns = np.array([position[index] for index in range(num_variables)], dtype=np.int64)
    samples = np.asarray(sampleset.record.sample)[:, columns]
    if sampleset.vartype is dimod.SPIN:
        samples = (samples + 1) // 2
    occurrences = np.asarray(sampleset.record.num_occurrences, dtype=np.float64)
    return samples.astype(np.uint8), occurrences


class DimodSamplerSolver(Solver):
    """Adapter: any ``dimod.Sampler`` instance becomes a qsurgeon block solver.

    ``alpha`` is the default penalty factor (a number, or "hard"); ``defaults`` are sampler
    keyword arguments used unless the call overrides them; ``lowest_only`` keeps only the
    lowest-energy reads (for samplers that return every state, like ``dimod.ExactSolver``).
    Register it under a name with :func:`qsurgeon.worker.solvers.register`.
    """

    def __init__(
        self,
        sampler: dimod.Sampler,
        name: str = "dimod",
        *,
        alpha: float | str = 0.5,
        defaults: dict[str, Any] | None = None,
        max_variables: int = MAX_DENSE_VARIABLES,
        description: str | None = None,
        deterministic: bool = False,
        exact: bool = False,
        device: str = "cpu",
        lowest_only: bool = False,
    ) -> None:
        if not hasattr(sampler, "sample") or not hasattr(sampler, "parameters"):
            raise UsageError(f"{type(sampler).__name__} is not a dimod sampler (needs .sample and .parameters)")
        self.sampler = sampler
        self.alpha = alpha
        self.defaults = dict(defaults or {})
        self.lowest_only = lowest_only
        self.capabilities = Capabilities(
            name=name,
            description=description or f"dimod sampler {type(sampler).__name__}, penalty + repair",
            max_variables=min(int(max_variables), MAX_DENSE_VARIABLES),
            constraints="penalty",
            device=device,
            deterministic=deterministic,
            exact=exact,
            extra="worker",
        )
        self.parameters = self._declare()

    # ------------------------------------------------------------------ parameters
    def _declare(self) -> tuple[Param, ...]:
        """The declaration, derived from the wrapped sampler's own ``parameters``: its read
        and sweep counts under qsurgeon's generic names (restarts, sweeps), bounded; any
        other sampler argument under its own name, passed on unchecked (only the sampler
        knows its types); plus the penalty factor and the seed, which every wrapper takes."""
        inverse = {target: generic for generic, target in _GENERIC_NAMES.items()}
        sampler = type(self.sampler).__name__
        declared = [
            Param("alpha", "alpha", "penalty factor, relative to the block's scale, or 'hard'", self.alpha),
            Param("seed", "int", "random seed of the sampler (ignored by samplers without one)",
                  self.defaults.get("seed"), minimum=0, maximum=2**31 - 1),
        ]
        for name in sorted(self.sampler.parameters):
            generic = inverse.get(name, name)
            default = self.defaults.get(name)
            if generic == "restarts":
                declared.append(Param("restarts", "int", f"reads ({sampler} num_reads)", default,
                                      minimum=1, maximum=MAX_READS))
            elif generic == "sweeps":
                declared.append(Param("sweeps", "int", f"sweeps per read ({sampler} num_sweeps)", default,
                                      minimum=1, maximum=MAX_SWEEPS))
            elif generic not in ("seed", "alpha"):
                declared.append(Param(name, "any", f"passed to {sampler} as is", default))
        return tuple(declared)

    def sampler_kwargs(self, problem: BlockProblem, params: dict[str, Any]) -> dict[str, Any]:
        """Translate qsurgeon parameters into the sampler's keyword arguments (or refuse).

        The sampler's own names for the generic ones (num_reads, num_sweeps) are accepted
        too. The constructor's ``defaults`` are checked like given values.
        """
        inverse = {target: generic for generic, target in _GENERIC_NAMES.items()}
        given = {inverse.get(key, key): value for key, value in params.items()}
        defaults = {inverse.get(key, key): value for key, value in self.defaults.items()}
        checked = check_params(self.parameters, {**defaults, **{k: v for k, v in given.items() if v is not None}},
                               self.name)
        accepted = set(self.sampler.parameters)
        kwargs = {_GENERIC_NAMES.get(key, key): value for key, value in checked.items() if key != "alpha"}
        return {key: value for key, value in kwargs.items() if key in accepted}

    def prepare(self, bqm: dimod.BinaryQuadraticModel, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Hook for backend-specific arguments derived from the model (e.g. SA's β range)."""
        return kwargs

    # ------------------------------------------------------------------ solving
    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        started = time.perf_counter()
        params = dict(params)
        alpha = params.pop("alpha", self.alpha)
        kwargs = self.sampler_kwargs(problem, params)
        model = PenaltyModel.build(problem, alpha, self.capabilities.max_variables)
        bqm = penalised_bqm(model)
        kwargs = self.prepare(bqm, kwargs)
        sampling_started = time.perf_counter()
        sampleset = self.sampler.sample(bqm, **kwargs)
        if self.lowest_only:
            sampleset = sampleset.lowest(rtol=0.0, atol=1e-12)
        sampling_seconds = time.perf_counter() - sampling_started
        samples, occurrences = samples_as_array(sampleset, problem.num_variables)
        outcome = model.repair_and_pick(samples, occurrences)
        metadata = {
            **model.metadata(), **outcome.metadata(), "sampler": type(self.sampler).__name__,
            "sampling_seconds": sampling_seconds,
            "sampler_params": {key: _json_friendly(value) for key, value in kwargs.items()},
        }
        return BlockSolution(
            x=outcome.x, energy=outcome.energy, solver=self.name, seconds=time.perf_counter() - started,
            sweeps=int(kwargs.get("num_sweeps", 0)), restarts=outcome.reads, problem_id=problem.id,
            metadata=metadata,
        )


def _json_friendly(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_friendly(item) for item in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)


def annealing_beta_range(bqm: dimod.BinaryQuadraticModel, num_probe_states: int = 32, seed: int = 0) -> list[float]:
    """β range for single-flip annealing, from the flip costs the model actually has.

    D-Wave's default helper loops over couplers in Python (~10 s at B = 4096) and takes
    the cold end from the smallest coupling, which for dense real-valued blocks is tiny and
    freezes most of the schedule. Here: probe random states, and set the hot end so the
    90th-percentile |ΔE| is accepted with probability ½ and the cold end so the
    1st-percentile nonzero |ΔE| is accepted with probability 1 %.
    """
    linear, (rows, cols, values), _ = bqm.to_numpy_vectors(variable_order=range(bqm.num_variables))
    size = bqm.num_variables
    matrix = np.zeros((size, size))
    matrix[rows, cols] = values / 2.0
    matrix[cols, rows] += values / 2.0
    matrix[np.diag_indices(size)] += linear
    rng = np.random.default_rng(seed)
    states = rng.integers(0, 2, size=(num_probe_states, size)).astype(np.float64)
    fields = states @ matrix
    costs = np.abs(np.diagonal(matrix) + 2.0 * (1.0 - 2.0 * states) * fields).reshape(-1)
    costs = costs[costs > 1e-12 * max(costs.max(initial=0.0), 1e-300)]
    if not costs.size:
        return [0.1, 1.0]
    hot = math.log(2.0) / float(np.quantile(costs, 0.9))
    cold = math.log(100.0) / float(np.quantile(costs, 0.01))
    return [hot, max(cold, hot * 1.0001)]


class NealSolver(DimodSamplerSolver):
    """D-Wave simulated annealing (single flips on the penalised BQM), α = 0.5."""

    def __init__(self) -> None:
        super().__init__(
            SimulatedAnnealingSampler(), "neal", alpha=0.5, defaults={"num_reads": 16, "num_sweeps": 1000},
            description="D-Wave simulated annealing (dwave-samplers), penalty + repair", deterministic=True,
        )

    def prepare(self, bqm: dimod.BinaryQuadraticModel, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "beta_range" not in kwargs and "beta_schedule" not in kwargs:
            kwargs = dict(kwargs, beta_range=annealing_beta_range(bqm, seed=int(kwargs.get("seed") or 0)))
        return kwargs


class TabuSolver(DimodSamplerSolver):
    """D-Wave tabu search, α = 16 (tabu walks far from the feasible set under a soft penalty).

    ``time_limit`` (seconds for the whole call) is split over the reads as tabu's
    per-read ``timeout`` (milliseconds); the default timeout grows with B.
    """

    def __init__(self) -> None:
        super().__init__(
            TabuSampler(), "tabu", alpha=16.0, defaults={"num_reads": 4},
            description="D-Wave tabu search (dwave-samplers), penalty + repair", deterministic=False,
        )

    def sampler_kwargs(self, problem: BlockProblem, params: dict[str, Any]) -> dict[str, Any]:
        params = dict(params)
        time_limit = check_params(self.parameters, {"time_limit": params.pop("time_limit", None)}, self.name)["time_limit"]
        kwargs = super().sampler_kwargs(problem, params)
        reads = int(kwargs.get("num_reads", 1))
        if time_limit is not None:
            kwargs["timeout"] = max(1, int(1000 * time_limit / reads))
        kwargs.setdefault("timeout", 20 + problem.num_variables // 8)
        return kwargs

    def _declare(self) -> tuple[Param, ...]:
        return super()._declare() + (
            Param("time_limit", "float", "seconds for the whole call, split over the reads as timeout", above=0.0),
        )


class SteepestDescentSolver(DimodSamplerSolver):
    """D-Wave steepest descent from random starts (a fast baseline), α = 0.5."""

    def __init__(self) -> None:
        super().__init__(
            _DWaveSteepestDescent(), "steepest", alpha=0.5, defaults={"num_reads": 64},
            description="D-Wave steepest descent (dwave-samplers), penalty + repair", deterministic=True,
        )


class ExactDimodSolver(DimodSamplerSolver):
    """``dimod.ExactSolver`` on the hard-penalised BQM: provably optimal, B ≤ 20.

    With ``alpha="hard"`` (the default) the BQM's ground state is the constrained optimum
    (see penalty.py), so this is exact; a soft ``alpha`` makes it a test of the penalty.
    """

    def __init__(self) -> None:
        super().__init__(
            dimod.ExactSolver(), "exact-dimod", alpha="hard", max_variables=MAX_EXACT_VARIABLES,
            description="dimod ExactSolver on the hard-penalised BQM (tiny problems)", deterministic=True,
            exact=True, lowest_only=True,
        )


__all__ = [
    "DimodSamplerSolver", "ExactDimodSolver", "MAX_EXACT_VARIABLES", "MAX_READS", "MAX_SWEEPS", "NealSolver",
    "SteepestDescentSolver", "TabuSolver", "annealing_beta_range", "penalised_bqm", "samples_as_array",
]
