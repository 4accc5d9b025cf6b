"""qsurgeon worker: the block problem format, the solver backends and the queue consumer."""

from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solve import solve, solve_batch
from qsurgeon.worker.solvers import Capabilities, Solver, all_capabilities, get_solver, solver_names

__all__ = [
    "BlockProblem", "BlockSolution", "Capabilities", "Solver", "all_capabilities", "get_solver",
    "solve", "solve_batch", "solver_names",
]
