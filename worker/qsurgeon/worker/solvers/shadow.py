"""``shadow``: a quantum solver shadowed by a classical reference, with routing (a composite).

Researchers who run iCBS blocks on quantum hardware want to know, block by block, what the
hardware bought them. Like dimod's composites wrap a sampler, :class:`ShadowSolver` wraps
two solvers named in its parameters:

- ``quantum`` (any registered solver, usually a cloud backend) answers the blocks that the
  ``route`` rule sends it (by default every block it can take: B ≤ its ``max_variables``);
- ``reference`` (a classical solver, optional) answers *every* block as well: the shadow.
  With ``merge="best"`` the lower-energy answer is returned; with ``merge="quantum"`` the
  quantum answer alone (a pure-hardware run), the reference only measuring it.

Blocks the route does not send to the quantum solver are answered by the reference (or by
``sa`` when there is none). Every answer carries ``metadata["shadow"]``: which way the
block was routed and why, both energies and times, which answer was chosen, and the
quantum answer's own metadata when it was not the one returned. The experiment record
(:mod:`qsurgeon.worker.experiment`) is built from it.

Being an ordinary registered solver, the composite runs wherever a solver name does: in
``qsurgeon prune`` (``--reference``, ``--merge``, ``--route`` build its parameters), in
a service worker (its parameters travel in the round as JSON), in ``qsurgeon solve``.

Route rules (``route``), comma-separated terms that must all hold:

``all``            every block the quantum solver can take (the default)
``size<=N``        blocks of at most N variables
``tensor=GLOB``    blocks of tensors matching the glob (repeat the term: any glob matches);
                   the tensor is read from the block id ``tensor:row:round`` iCBS gives
``fraction=F``     a deterministic sample of about F of the blocks, by a hash of the block
                   id, so a quantum and a classical run sample the same blocks
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from qsurgeon.client.errors import QsurgeonError, UsageError
from qsurgeon.client.options import DEFAULT_SOLVER
from qsurgeon.worker.block.problem import MAX_VARIABLES, BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import BatchSolver, Capabilities, Param, Solver, check_params

MERGES = ("best", "quantum")
#: the classical solver for blocks the route keeps off the quantum solver when no reference is named
DEFAULT_CLASSICAL = DEFAULT_SOLVER
_SEED_BOUND = 2**127

PARAMETERS = (
    Param("quantum", "str", "the solver that answers routed blocks (usually a cloud backend)"),
    Param("quantum_params", "any", "its parameters (a mapping, checked against its declaration)"),
    Param("reference", "str", "classical solver that also answers every block (none: no shadow)"),
    Param("reference_params", "any", "the reference's parameters (or auto's, without a reference)"),
    Param("merge", "str", "best: the lower-energy answer; quantum: the quantum answer alone", "best",
          choices=MERGES),
    Param("route", "str", "which blocks go to the quantum solver: all, size<=N, tensor=GLOB, fraction=F "
          "(comma-separated, all must hold)", "all"),
    Param("seed", "int", "random seed passed to both solvers", minimum=-_SEED_BOUND, maximum=_SEED_BOUND - 1),
)


def block_identity(problem_id: str) -> tuple[str | None, int | None, int | None]:
    """(tensor, row, round) from an iCBS block id ``tensor:row:round``; Nones for other ids."""
    parts = str(problem_id).rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2].isdigit():
        return parts[0], int(parts[1]), int(parts[2])
    return None, None, None


@dataclass(frozen=True)
class Route:
    """A parsed route rule (see the module docstring)."""

    max_size: int | None = None
    tensors: tuple[str, ...] = ()
    fraction: float | None = None
    text: str = "all"

    @classmethod
    def parse(cls, text: str | None) -> "Route":
        """The rule spelled by ``text``; UsageError naming the bad term and the grammar."""
        if text is None or not str(text).strip():
            return cls()
        max_size, tensors, fraction = None, [], None
        for term in (part.strip() for part in str(text).split(",")):
            name, _, value = term.partition("<=") if "<=" in term else term.partition("=")
            name, value = name.strip().lower(), value.strip()
            try:
                if term.lower() == "all":
                    continue
                if name == "size" and "<=" in term:
                    max_size = int(value)
                    if max_size < 1:
                        raise ValueError
                elif name == "tensor" and value:
                    tensors.append(value)
                elif name == "fraction":
                    fraction = float(value)
                    if not 0.0 <= fraction <= 1.0:
                        raise ValueError
                else:
                    raise ValueError
            except ValueError:
                raise UsageError(f"route: cannot read {term!r}; give comma-separated terms of all, size<=N, "
                                 "tensor=GLOB, fraction=F (0..1)") from None
        return cls(max_size=max_size, tensors=tuple(tensors), fraction=fraction, text=str(text))

    def decide(self, problem: BlockProblem, capacity: int) -> tuple[bool, str]:
        """(whether ``problem`` goes to the quantum solver, the reason in words)."""
        size = problem.num_variables
        if size > capacity:
            return False, f"B={size} > the solver's {capacity}"
        if self.max_size is not None and size > self.max_size:
            return False, f"B={size} > size<={self.max_size}"
        if self.tensors:
            tensor = block_identity(problem.id)[0] or str(problem.meta.get("tensor", ""))
            if not any(fnmatch.fnmatchcase(tensor, pattern) for pattern in self.tensors):
                return False, f"tensor {tensor or '?'} not in {', '.join(self.tensors)}"
        if self.fraction is not None and sample_point(problem) >= self.fraction:
            return False, f"not in the fraction={self.fraction:g} sample"
        return True, "routed"


def sample_point(problem: BlockProblem) -> float:
    """A point in [0, 1) fixed by the block's id (or, without one, its matrix): the same
    block lands in the same sample in every run, whatever else shares its round."""
    key = problem.id.encode() if problem.id else (problem.Q if problem.Q is not None else problem.F).tobytes()
    return zlib.crc32(key) / 2**32


class ShadowSolver(BatchSolver):
    """The composite: see the module docstring."""

    parameters = PARAMETERS

    def __init__(self, name: str = "shadow") -> None:
        self.capabilities = Capabilities(
            name=name, description="composite: a quantum solver shadowed by a classical reference, with routing",
            max_variables=MAX_VARIABLES, constraints="native", device="composite",
            deterministic=False, cost_model="the quantum solver's, for the blocks routed to it",
        )

    # ------------------------------------------------------------------ parameters
    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The composite's own checks, then each wrapped solver's against its declaration."""
        from qsurgeon.worker.solvers.registry import check_solver_params

        checked = check_params(self.declared_parameters(), params, self.name)
        if not checked.get("quantum"):
            raise UsageError(f"{self.name}: name the quantum solver (parameter quantum)")
        Route.parse(checked.get("route"))
        for role in ("quantum", "reference"):
            nested = checked.get(f"{role}_params")
            if nested is None:
                nested = {}
            if not isinstance(nested, Mapping):
                raise UsageError(f"{self.name}: {role}_params must be a mapping of parameter names to values")
            solver = checked.get(role) or (DEFAULT_CLASSICAL if role == "reference" else None)
            if solver == self.name:
                raise UsageError(f"{self.name}: the {role} solver cannot be {self.name} itself")
            checked[f"{role}_params"] = check_solver_params(solver, {k: v for k, v in nested.items() if k != "seed"})
        checked.setdefault("merge", "best")
        checked["merge"] = checked["merge"] or "best"
        return checked

    # ------------------------------------------------------------------ solving
    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        from qsurgeon.worker.solve import solve_each_on_failure
        from qsurgeon.worker.solvers.registry import get_solver

        settings = self.check_params(params)
        quantum = get_solver(settings["quantum"])
        reference_name = settings.get("reference")
        classical = get_solver(reference_name or DEFAULT_CLASSICAL)
        route = Route.parse(settings.get("route"))
        seeded = {} if settings.get("seed") is None else {"seed": settings["seed"]}
        problems = list(problems)

        decisions = [route.decide(problem, quantum.capabilities.max_variables) for problem in problems]
        routed = [index for index, (takes, _) in enumerate(decisions) if takes]
        def answer(indices: list[int], solver: Solver, params: Mapping[str, Any]):
            """The answers of ``solver`` to problems[indices] by index, and why those that failed did."""
            if not indices:
                return {}, {}
            answers, reasons = solve_each_on_failure([problems[i] for i in indices], solver, {**params, **seeded})
            return (dict(zip(indices, answers)),
                    {i: reason for i, a, reason in zip(indices, answers, reasons) if a is None})

        quantum_answers, quantum_failures = answer(routed, quantum, settings["quantum_params"])
        # the reference shadows every block; without one, the default solver answers only what the
        # quantum solver did not
        classical_indices = (list(range(len(problems))) if reference_name
                             else [i for i in range(len(problems)) if quantum_answers.get(i) is None])
        classical_answers, classical_failures = answer(classical_indices, classical, settings["reference_params"])

        solutions = []
        for index, problem in enumerate(problems):
            ours, theirs = quantum_answers.get(index), classical_answers.get(index)
            if ours is None and theirs is None:
                reason = quantum_failures.get(index) or classical_failures.get(index) or "no answer"
                raise QsurgeonError(f"{self.name}: block {problem.id or index} got no answer: {reason}")
            if ours is not None and (theirs is None or settings["merge"] == "quantum"
                                     or ours.energy <= theirs.energy):
                chosen, which = ours, "quantum"
            else:
                chosen, which = theirs, ("reference" if reference_name else "classical")
            shadow = {
                "route": "quantum" if decisions[index][0] else "classical", "route_reason": decisions[index][1],
                "rule": route.text, "merge": settings["merge"], "chosen": which,
                "quantum_solver": quantum.name, "quantum_answered_by": None if ours is None else ours.solver,
                "quantum_energy": None if ours is None else ours.energy,
                "quantum_seconds": None if ours is None else ours.seconds,
                "quantum_failure": quantum_failures.get(index),
                "quantum_metadata": None if ours is None or which == "quantum" else dict(ours.metadata),
                "reference_solver": reference_name, "classical_solver": classical.name,
                "reference_energy": None if theirs is None else theirs.energy,
                "reference_seconds": None if theirs is None else theirs.seconds,
                "reference_failure": classical_failures.get(index),
            }
            seconds = sum(answer.seconds for answer in (ours, theirs) if answer is not None)
            solutions.append(BlockSolution(
                x=chosen.x, energy=chosen.energy, solver=chosen.solver, seconds=seconds, sweeps=chosen.sweeps,
                restarts=chosen.restarts, problem_id=problem.id,
                metadata={**chosen.metadata, "shadow": shadow},
            ))
        return solutions


def shadow_params(solver: str, solver_params: Mapping[str, Any], *, reference: str | None, merge: str,
                  route: str | None, reference_params: Mapping[str, Any] | None = None,
                  seed: int | None = None) -> dict[str, Any]:
    """The composite's parameters for a run of ``solver`` shadowed by ``reference`` and/or routed."""
    params: dict[str, Any] = {
        "quantum": solver, "quantum_params": {k: v for k, v in solver_params.items() if k != "seed"},
        "reference": reference, "reference_params": dict(reference_params or {}), "merge": merge,
        "route": route or "all",
    }
    if seed is not None:
        params["seed"] = seed
    return params


__all__ = ["MERGES", "Route", "ShadowSolver", "block_identity", "sample_point", "shadow_params"]
