"""Block solvers behind one interface; see :mod:`qsurgeon.worker.solvers.registry`."""

from qsurgeon.worker.solvers.base import Capabilities, Solver
from qsurgeon.worker.solvers.registry import all_capabilities, capabilities, get_solver, register, solver_names

__all__ = ["Capabilities", "Solver", "all_capabilities", "capabilities", "get_solver", "register", "solver_names"]
