"""``solve`` and ``solve_batch``: the one entry point every caller uses.

Whatever backend answers, the answer is checked here: exact counts in every group (else
InfeasibleSolutionError) and the energy recomputed in float64 from the problem itself.
The solver's own figure is kept in the metadata when it disagrees.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from qsurgeon.client.errors import ProblemTooLargeError, QsurgeonError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import Solver
from qsurgeon.worker.solvers.registry import get_solver

log = logging.getLogger(__name__)


def _resolve(solver: str | Solver) -> Solver:
    return solver if isinstance(solver, Solver) else get_solver(solver)


def _check_size(backend: Solver, problem: BlockProblem) -> None:
    limit = backend.capabilities.max_variables
    if problem.num_variables > limit:
        label = f"problem {problem.id!r}" if problem.id else "problem"
        raise ProblemTooLargeError(
            f"{label} has {problem.num_variables} variables; solver {backend.name!r} accepts at most {limit}"
        )


def checked(problem: BlockProblem, solution: BlockSolution) -> BlockSolution:
    """Validate feasibility and replace the energy with our own float64 evaluation."""
    x = problem.check_feasible(solution.x, solution.solver)
    energy = problem.energy(x)
    metadata = dict(solution.metadata)
    reported = solution.energy
    if reported != energy and not abs(reported - energy) <= 1e-9 * max(1.0, abs(energy)):
        metadata["reported_energy"] = reported
    return BlockSolution(
        x=x, energy=energy, solver=solution.solver, seconds=solution.seconds, sweeps=solution.sweeps,
        restarts=solution.restarts, problem_id=problem.id, metadata=metadata,
    )


def solve(problem: BlockProblem, solver: str | Solver = "sa", **params: Any) -> BlockSolution:
    """Solve one block problem with the named solver and return a checked answer."""
    backend = _resolve(solver)
    _check_size(backend, problem)
    return checked(problem, backend.sample(problem, **params))


def solve_batch(problems: Sequence[BlockProblem], solver: str | Solver = "sa", **params: Any) -> list[BlockSolution]:
    """Solve many problems in one call (vectorised where the solver can); answers are checked.

    Each answer depends only on its problem, the seed and the parameters, never on which
    other problems share the batch.
    """
    backend = _resolve(solver)
    for problem in problems:
        _check_size(backend, problem)
    if not problems:
        return []
    solutions = backend.sample_batch(list(problems), **params)
    if len(solutions) != len(problems):
        raise RuntimeError(f"solver {backend.name!r} returned {len(solutions)} answers for {len(problems)} problems")
    return [checked(problem, solution) for problem, solution in zip(problems, solutions)]


def solve_each_on_failure(problems: Sequence[BlockProblem], solver: str | Solver,
                          params: Mapping[str, Any]) -> tuple[list[BlockSolution | None], list[str]]:
    """Solve a round's problems as one batch; if the batch fails, solve them one by one.

    One bad block (too large, an infeasible answer) must not fail the blocks that share
    its batch, so a QsurgeonError from the batch is retried per problem and only the
    problems that fail alone come back as ``None``, with the reason at the same index
    (``""`` for the solved ones). Errors that are not QsurgeonError propagate: they are
    bugs or crashes, which the caller handles as it sees fit.
    """
    problems = list(problems)
    try:
        solutions: list[BlockSolution | None] = list(solve_batch(problems, solver, **params))
        return solutions, [""] * len(solutions)
    except QsurgeonError as error:
        if len(problems) == 1:
            return [None], [str(error)]
        log.warning("batch of %d blocks failed (%s); solving them one by one", len(problems), error)
    solutions, reasons = [], []
    for problem in problems:
        try:
            solutions.append(solve(problem, solver, **params))
            reasons.append("")
        except QsurgeonError as error:
            solutions.append(None)
            reasons.append(str(error))
    return solutions, reasons
