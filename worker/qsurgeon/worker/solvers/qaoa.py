"""QAOA on a block: Qiskit's QAOA through qiskit-optimization, one qubit per variable.

The block becomes a ``QuadraticProgram`` (objective xᵀQx/scale, one linear equality
constraint per group), qiskit-optimization's ``QuadraticProgramToQubo`` folds the
constraints in with *our* penalty (penalty.py; its automatic penalty was 3–12× worse,
docs/solvers.md), and QAOA (``qiskit_optimization.minimum_eigensolvers``) optimises the
circuit angles with a classical optimizer on a sampler. Every bitstring in the final
distribution, plus the best one seen during the optimisation, is repaired to exact
counts and scored in float64; the best is returned. The energy reported is the block's
true energy of that bitstring, never the QAOA expectation (which is kept in metadata).

The default sampler is Aer's ``SamplerV2`` on a local ``AerSimulator`` with a preset pass
manager; pass ``QAOASolver(sampler=...)`` (and ``pass_manager=`` for hardware ISA
circuits) to use any other V2 sampler primitive, e.g. ``StatevectorSampler`` or an IBM
runtime sampler. Simulation cost doubles per qubit: blocks above ``MAX_QAOA_QUBITS`` = 20
are refused (B = 16 already takes seconds, and at p ≤ 2 QAOA is no better than random
sampling on these problems: it is here to run pruning blocks on quantum hardware, not to
beat the annealer).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qiskit_optimization import QuadraticProgram
from qiskit_optimization.converters import QuadraticProgramToQubo
from qiskit_optimization.minimum_eigensolvers import QAOA
from qiskit_optimization.optimizers import COBYLA, NELDER_MEAD, SPSA, Optimizer

from qsurgeon.client.errors import ProblemTooLargeError, UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import Capabilities, Param, Solver, check_params
from qsurgeon.worker.solvers.penalty import PenaltyModel

#: One qubit per variable; statevector simulation beyond this takes minutes per block.
MAX_QAOA_QUBITS = 20
MAX_REPS = 10
MAX_ITERATIONS = 10_000
MAX_SHOTS = 1_000_000

_OPTIMIZERS = {"cobyla": COBYLA, "nelder-mead": NELDER_MEAD, "spsa": SPSA}


def block_program(problem: BlockProblem, model: PenaltyModel) -> QuadraticProgram:
    """The block as a QuadraticProgram: minimise xᵀQx/scale s.t. Σ_{i∈g} x_i = count_g."""
    program = QuadraticProgram(name=problem.id or "block")
    size = problem.num_variables
    names = [f"x{index}" for index in range(size)]
    for name in names:
        program.binary_var(name)
    scaled = model.Q / model.scale
    upper_rows, upper_cols = np.triu_indices(size, 1)
    quadratic = {
        (names[i], names[j]): 2.0 * float(scaled[i, j])
        for i, j in zip(upper_rows.tolist(), upper_cols.tolist()) if scaled[i, j] != 0.0
    }
    linear = {names[i]: float(scaled[i, i]) for i in range(size) if scaled[i, i] != 0.0}
    program.minimize(linear=linear, quadratic=quadratic)
    for group, members in enumerate(problem.group_members()):
        program.linear_constraint(
            linear={names[i]: 1 for i in members.tolist()}, sense="==", rhs=int(problem.counts[group]),
            name=f"group{group}",
        )
    return program


def bits_of(states: np.ndarray, num_variables: int) -> np.ndarray:
    """Integer basis states -> (n, B) bits; bit i of the integer is qubit i is variable i."""
    states = np.asarray(states, dtype=np.int64)
    return ((states[:, None] >> np.arange(num_variables, dtype=np.int64)) & 1).astype(np.uint8)


class QAOASolver(Solver):
    """QAOA with a local Aer simulator by default, or any Qiskit V2 Sampler primitive.

    Parameters per call (defaults from the constructor): ``reps`` (p), ``optimizer``
    ("cobyla", "nelder-mead", "spsa"), ``maxiter``, ``shots`` (default sampler only),
    ``seed`` (simulator and initial angles), ``alpha`` (penalty factor or "hard").
    """

    def __init__(
        self,
        sampler: Any = None,
        *,
        pass_manager: Any = None,
        name: str = "qaoa",
        reps: int = 1,
        optimizer: str | Optimizer = "cobyla",
        maxiter: int = 40,
        shots: int = 1024,
        alpha: float | str = 1.0,
    ) -> None:
        self.user_sampler = sampler
        self.pass_manager = pass_manager
        self.parameters = (
            Param("reps", "int", "QAOA layers (p)", reps, minimum=1, maximum=MAX_REPS),
            Param("optimizer", "str", "classical optimiser of the angles (or, from Python, an Optimizer)",
                  optimizer, choices=tuple(_OPTIMIZERS)),
            Param("maxiter", "int", "optimiser iterations", maxiter, minimum=1, maximum=MAX_ITERATIONS),
            Param("shots", "int", "shots per circuit (the default simulator only)", shots, minimum=1, maximum=MAX_SHOTS),
            Param("alpha", "alpha", "penalty factor, relative to the block's scale, or 'hard'", alpha),
            Param("seed", "int", "seed of the simulator and the initial angles", minimum=0),
        )
        self.defaults = {param.name: param.default for param in self.parameters if param.name != "seed"}
        self._aer_pass_manager = None
        self.capabilities = Capabilities(
            name=name,
            description=(
                "QAOA through qiskit-optimization on a local Aer simulator" if sampler is None
                else f"QAOA through qiskit-optimization on {type(sampler).__name__}"
            ),
            max_variables=MAX_QAOA_QUBITS,
            constraints="penalty",
            device="simulator" if sampler is None else "remote",
            deterministic=sampler is None,
            extra="quantum",
        )

    # ------------------------------------------------------------------ set-up
    def _sampler_and_pass_manager(self, shots: int, seed: int | None) -> tuple[Any, Any]:
        if self.user_sampler is not None:
            return self.user_sampler, self.pass_manager
        from qiskit.transpiler import generate_preset_pass_manager
        from qiskit_aer import AerSimulator
        from qiskit_aer.primitives import SamplerV2

        if self._aer_pass_manager is None:
            self._aer_pass_manager = generate_preset_pass_manager(optimization_level=1, backend=AerSimulator())
        return SamplerV2(default_shots=shots, seed=seed), self._aer_pass_manager

    def _settings(self, params: dict[str, Any]) -> dict[str, Any]:
        settings = {**self.defaults, **params}
        optimizer = settings["optimizer"]
        if isinstance(optimizer, str):  # names are case-blind; an Optimizer object is taken as it is
            settings["optimizer"] = optimizer.lower()
        checkable = {key: value for key, value in settings.items() if not isinstance(value, Optimizer)}
        settings.update(check_params(self.parameters, checkable, self.name))
        optimizer = settings["optimizer"]
        if isinstance(optimizer, str):
            settings["optimizer_name"] = optimizer.lower()
            settings["optimizer"] = _OPTIMIZERS[optimizer.lower()](maxiter=settings["maxiter"])
        elif isinstance(optimizer, Optimizer):
            settings["optimizer_name"] = type(optimizer).__name__
        else:
            raise UsageError(f"optimizer must be a name or a qiskit-optimization Optimizer, got {optimizer!r}")
        return settings

    # ------------------------------------------------------------------ solving
    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        if problem.num_variables > MAX_QAOA_QUBITS:
            raise ProblemTooLargeError(
                f"QAOA needs one qubit per variable: {problem.num_variables} variables is above the "
                f"simulation limit of {MAX_QAOA_QUBITS}"
            )
        started = time.perf_counter()
        settings = self._settings(params)
        seed = settings.get("seed")
        model = PenaltyModel.build(problem, settings["alpha"], MAX_QAOA_QUBITS)
        program = block_program(problem, model)
        qubo = QuadraticProgramToQubo(penalty=model.strength / model.scale).convert(program)
        operator, ising_offset = qubo.to_ising()
        sampler, pass_manager = self._sampler_and_pass_manager(settings["shots"], seed)
        rng = np.random.default_rng(seed)
        qaoa = QAOA(
            sampler, settings["optimizer"], reps=settings["reps"], pass_manager=pass_manager,
            initial_point=rng.uniform(0.0, np.pi / 2, size=2 * settings["reps"]),
        )
        result = qaoa.compute_minimum_eigenvalue(operator)
        distribution = dict(result.eigenstate or {})
        best_seen = (result.best_measurement or {}).get("state")
        states = np.array(list(distribution) + ([best_seen] if best_seen is not None else []), dtype=np.int64)
        weights = np.array(list(distribution.values()) + ([0.0] if best_seen is not None else []), dtype=np.float64)
        outcome = model.repair_and_pick(bits_of(states, problem.num_variables), np.maximum(weights, 0.0))
        returned_state = int(np.sum(outcome.x.astype(np.int64) << np.arange(problem.num_variables)))
        expected = (float(np.real(result.eigenvalue)) + float(ising_offset)) * model.scale + problem.offset
        metadata = {
            **model.metadata(), **outcome.metadata(),
            "reads": int(getattr(result.eigenstate, "shots", None) or settings["shots"]),
            "qubits": problem.num_variables, "reps": settings["reps"], "optimizer": settings["optimizer_name"],
            "maxiter": settings["maxiter"], "cost_function_evals": int(result.cost_function_evals or 0),
            "expected_penalised_energy": expected,
            "returned_probability": float(max(distribution.get(returned_state, 0.0), 0.0)),
            "sampler": type(sampler).__name__,
        }
        return BlockSolution(
            x=outcome.x, energy=outcome.energy, solver=self.name, seconds=time.perf_counter() - started,
            restarts=settings["reps"], problem_id=problem.id, metadata=metadata,
        )


__all__ = ["MAX_QAOA_QUBITS", "QAOASolver", "bits_of", "block_program"]
