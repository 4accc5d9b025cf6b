"""Which solvers exist, what they can do, and how to get one by name.

Built-in backends are listed here by name and imported only when first used, so a
missing optional dependency turns into "install qsurgeon[quantum]" instead of an
ImportError at start-up. Third-party backends register through the entry-point group
``qsurgeon.backends`` (name -> a Solver subclass or a zero-argument factory).
What each solver takes is its own declaration (:class:`~qsurgeon.worker.solvers.base.Param`);
:func:`check_solver_params` checks a request against it.
A backend is only ever chosen by its registered name: no module path from a request or
a file is ever imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from qsurgeon.client.errors import SolverUnavailableError, UsageError
from qsurgeon.worker.solvers.base import Capabilities, Param, Solver

ENTRY_POINT_GROUP = "qsurgeon.backends"


@dataclass(frozen=True)
class _BuiltinSpec:
    module: str
    attribute: str
    extra: str
    description: str


#: name -> where the backend lives. Only these module paths are ever imported by name.
BUILTIN_SOLVERS: dict[str, _BuiltinSpec] = {
    "exhaustive": _BuiltinSpec("qsurgeon.worker.solvers.exhaustive", "ExhaustiveSolver", "worker",
                               "exact enumeration of all feasible assignments"),
    "sa": _BuiltinSpec("qsurgeon.worker.solvers.sa", "SimulatedAnnealingSolver", "worker",
                       "cardinality-preserving simulated annealing with swap moves (CPU kernel or CUDA)"),
    "swap-tabu": _BuiltinSpec("qsurgeon.worker.solvers.swap_tabu", "SwapTabuSolver", "worker",
                              "swap tabu search inside groups (best swap or drop-add; CPU kernel; dense or factored, "
                              "B ≤ 4096)"),
    "auto": _BuiltinSpec("qsurgeon.worker.solvers.auto", "AutoSolver", "worker",
                         "picks exhaustive, swap-tabu or sa and its effort per block (size, groups)"),
    "neal": _BuiltinSpec("qsurgeon.worker.solvers.dimod_backends", "NealSolver", "worker",
                         "D-Wave simulated annealing (dwave-samplers), penalty + repair"),
    "tabu": _BuiltinSpec("qsurgeon.worker.solvers.dimod_backends", "TabuSolver", "worker",
                         "D-Wave tabu search (dwave-samplers), penalty + repair"),
    "steepest": _BuiltinSpec("qsurgeon.worker.solvers.dimod_backends", "SteepestDescentSolver", "worker",
                             "D-Wave steepest descent (dwave-samplers), penalty + repair"),
    "exact-dimod": _BuiltinSpec("qsurgeon.worker.solvers.dimod_backends", "ExactDimodSolver", "worker",
                                "dimod ExactSolver (tiny problems), penalty + repair"),
    "qaoa": _BuiltinSpec("qsurgeon.worker.solvers.qaoa", "QAOASolver", "quantum",
                         "QAOA through qiskit-optimization on a local simulator"),
    "shadow": _BuiltinSpec("qsurgeon.worker.solvers.shadow", "ShadowSolver", "worker",
                           "composite: a quantum solver shadowed by a classical reference, with routing"),
    # Cloud services (docs/quantum.md): each in its own extra; remote, budgeted, with a classical fallback.
    "dwave-qpu": _BuiltinSpec("qsurgeon.worker.solvers.cloud.dwave", "DWaveQPUSolver", "dwave",
                              "D-Wave QPU (Leap) on a clique embedding, penalty + repair"),
    "dwave-hybrid": _BuiltinSpec("qsurgeon.worker.solvers.cloud.dwave", "DWaveHybridSolver", "dwave",
                                 "D-Wave Leap hybrid CQM solver, counts as native equality constraints"),
    "ibm-qaoa": _BuiltinSpec("qsurgeon.worker.solvers.cloud.ibm", "IBMQAOASolver", "ibm",
                             "QAOA on IBM Quantum (qiskit-ibm-runtime SamplerV2 in a Batch)"),
    "braket-qaoa": _BuiltinSpec("qsurgeon.worker.solvers.cloud.braket", "BraketQAOASolver", "braket",
                                "QAOA on an Amazon Braket gate-model device by ARN"),
}

_instances: dict[str, Solver] = {}


def _load_builtin(name: str) -> Solver:
    spec = BUILTIN_SOLVERS[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as error:
        if error.name == spec.module:
            raise SolverUnavailableError(f"solver {name!r} is not part of this build") from None
        raise SolverUnavailableError(
            f"solver {name!r} needs the [{spec.extra}] extra ({error.name or error} is missing): "
            f"pip install 'qsurgeon[{spec.extra}]'"
        ) from None
    return getattr(module, spec.attribute)()


@lru_cache(maxsize=1)
def _plugin_entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_SOLVERS}


def _load_plugin(name: str) -> Solver:
    entry_point = _plugin_entry_points()[name]
    try:
        factory: Callable[[], Solver] = entry_point.load()  # type: ignore[attr-defined]
        solver = factory()
    except Exception as error:  # a broken plug-in must not take the service down
        raise SolverUnavailableError(f"plug-in solver {name!r} failed to load: {error}") from None
    if not isinstance(solver, Solver):
        raise SolverUnavailableError(f"plug-in solver {name!r} is not a qsurgeon Solver")
    return solver


def register(solver: Solver) -> None:
    """Register a solver instance under its capabilities' name (for users' own code)."""
    _instances[solver.name] = solver


def solver_names() -> list[str]:
    return sorted(set(BUILTIN_SOLVERS) | set(_plugin_entry_points()) | set(_instances))


def get_solver(name: str) -> Solver:
    """The solver registered under ``name``; raises SolverUnavailableError with the fix."""
    if name in _instances:
        return _instances[name]
    if name in BUILTIN_SOLVERS:
        solver = _load_builtin(name)
    elif name in _plugin_entry_points():
        solver = _load_plugin(name)
    else:
        raise SolverUnavailableError(f"unknown solver {name!r}; choose one of: {', '.join(solver_names())}")
    _instances[name] = solver
    return solver


def capabilities(name: str) -> Capabilities:
    """Capabilities of one solver, with installed=False and the reason when it cannot load."""
    try:
        return get_solver(name).capabilities
    except SolverUnavailableError as error:
        spec = BUILTIN_SOLVERS.get(name)
        return Capabilities(
            name=name, description=spec.description if spec else "plug-in", max_variables=0,
            constraints="unknown", device="unknown", extra=spec.extra if spec else "",
            installed=False, missing=str(error),
        )


def all_capabilities() -> list[Capabilities]:
    return [capabilities(name) for name in solver_names()]


def _known_solver(name: str) -> Solver:
    """The solver ``name``; an unknown name is a UsageError listing the installed solvers."""
    if name not in solver_names():
        installed = [c.name for c in all_capabilities() if c.installed]
        raise UsageError(f"unknown solver {name!r}; installed solvers: {', '.join(installed)}")
    return get_solver(name)


def solver_parameters(name: str) -> tuple[Param, ...]:
    """What solver ``name`` declares it takes (``seed`` alone for a solver without a declaration)."""
    return _known_solver(name).declared_parameters()


def check_solver_params(solver: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` for ``solver``, checked against its declaration and typed; defaults are not filled in.

    For callers that must refuse a bad request before any work starts (the service checks
    a job's parameters before accepting it). Raises UsageError naming the bad parameter and
    listing the accepted ones, or, for an unknown solver, listing the installed solvers.
    """
    return _known_solver(solver).check_params(params)


def unregister(name: str) -> None:
    _instances.pop(name, None)


__all__ = [
    "BUILTIN_SOLVERS", "ENTRY_POINT_GROUP", "Capabilities", "all_capabilities", "capabilities",
    "check_solver_params", "get_solver", "register", "solver_names", "solver_parameters", "unregister",
]
