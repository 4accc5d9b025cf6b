"""The Queue: how the engine hands a round of block problems to solvers.

The iCBS engine never calls a solver directly; it submits each round of independent
blocks to a Queue and merges what comes back. Embedded runs use
:class:`~qsurgeon.worker.queue.inprocess.InProcessQueue` (solve in this process, one
vectorised batch); the service uses :class:`~qsurgeon.worker.queue.producer.RedisQueue`
with the same interface, so the engine is the same code on both paths.

A block that cannot be solved comes back as ``None``: the engine then keeps that block's
current assignment, which is always feasible, and records the failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from qsurgeon.worker.block.problem import BlockProblem, BlockSolution


@dataclass(frozen=True)
class RoundRequest:
    """One round of independent block problems, all for the same solver and parameters."""

    job_id: str
    round_id: str  # unique within the job; (round_id, problem.id) identifies a block
    problems: Sequence[BlockProblem]
    solver: str = "sa"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RoundResult:
    solutions: list[BlockSolution | None]
    failures: dict[str, str] = field(default_factory=dict)  # problem id -> reason
    retried: int = 0  # blocks answered on a second or later delivery (a worker died or stalled)
    dead: int = 0  # blocks dead-lettered after too many deliveries (also among ``failures``)
    resent: int = 0  # blocks sent again because Redis lost the round (restarted without its data)


class Queue(Protocol):
    """Carries a round of block problems to solvers and their answers back."""

    def run_round(self, request: RoundRequest) -> RoundResult:
        """Solve every problem of the round; failed blocks come back as ``None``."""
        ...
