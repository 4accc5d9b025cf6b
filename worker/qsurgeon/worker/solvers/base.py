"""The solver interface, in the spirit of dimod's Sampler: one ``sample`` method.

A solver turns a :class:`BlockProblem` into a :class:`BlockSolution`. ``sample_batch``
exists because vectorised solvers (the annealer) answer many problems in one call; its
default simply loops. Solvers do not need to check their own answers or recompute
energies: :func:`qsurgeon.worker.solve` does both for every solver, so a buggy backend
can never push an infeasible or mis-scored answer into a pruning job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, shown by ``qsurgeon solvers`` and ``GET /v1/solvers``."""

    name: str
    description: str
    max_variables: int
    constraints: str  # "native" (keeps counts by construction) or "penalty" (+ repair)
    device: str  # "cpu", "cpu/cuda", "simulator", "remote"
    needs_gpu: bool = False
    deterministic: bool = True  # same seed, same answer
    exact: bool = False  # proves optimality
    extra: str = "worker"  # the pip extra that installs its dependencies
    installed: bool = True
    missing: str = ""  # why it is not installed, when it is not

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Solver(ABC):
    """A block solver. Subclasses set ``capabilities`` and implement :meth:`sample`."""

    capabilities: Capabilities

    @property
    def name(self) -> str:
        return self.capabilities.name

    @abstractmethod
    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        """Answer one problem. ``params`` are solver-specific (seed, restarts, ...)."""

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Answer many problems; each answer must equal what :meth:`sample` gives alone."""
        return [self.sample(problem, **params) for problem in problems]


def starts_from_x0(problem: BlockProblem, start: str, solver: str) -> bool:
    """Whether a chain of ``solver`` starts from the problem's ``x0`` under its ``start`` parameter.

    ``"random"`` never does, ``"x0"`` always does (a problem without ``x0`` is an error),
    ``"auto"`` does when the problem has one.
    """
    if start == "random":
        return False
    if start == "x0" and problem.x0 is None:
        label = f"problem {problem.id!r}" if problem.id else "a problem"
        raise UsageError(f"{solver}: start='x0' but {label} has no x0")
    return problem.x0 is not None
