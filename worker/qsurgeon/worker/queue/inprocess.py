"""The embedded Queue: a round is solved in this process, as one vectorised batch."""

from __future__ import annotations

from qsurgeon.worker.queue.base import RoundRequest, RoundResult
from qsurgeon.worker.solve import solve_each_on_failure


class InProcessQueue:
    """The default of ``qsurgeon prune`` and the SDK: no service, no Redis.

    A batch that fails is retried one problem at a time, as the workers do, so one bad
    block only fails itself.
    """

    def run_round(self, request: RoundRequest) -> RoundResult:
        problems = list(request.problems)
        solutions, reasons = solve_each_on_failure(problems, request.solver, dict(request.params))
        failures = {problem.id: reason for problem, solution, reason in zip(problems, solutions, reasons)
                    if solution is None}
        return RoundResult(solutions=solutions, failures=failures)
