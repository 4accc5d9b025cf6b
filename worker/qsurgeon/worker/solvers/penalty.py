"""Constraint -> quadratic penalty, the penalty strength rule, and greedy repair.

Samplers that only minimise an unconstrained QUBO (D-Wave's dimod samplers, QAOA) see
the block with its constraint folded into the objective:

    P(x) = xᵀQx + λ · Σ_g (Σ_{i∈g} x_i − count_g)²

Expanded with x_i² = x_i this is again a QUBO: ``λ`` on every entry (i, j) with i and j in
the same group, ``−2λ·count_g`` more on the diagonal, ``λ·Σ_g count_g²`` as offset (see
:meth:`PenaltyModel.penalised_qubo`). What comes back is checked and, when the counts are
wrong, repaired by greedy single flips that each cost the least energy, so every answer
is feasible whatever the penalty was.

Penalty strength, λ = α·λ₀ (docs/solvers.md: a *soft* penalty plus repair wins):

- ``λ₀`` is the largest single-flip saving at the greedy feasible solution (the repair of
  the all-zeros assignment): the most a sampler can gain by leaving the feasible set in
  one step from a good feasible point. A tiny floor (1e-3 of the problem's scale) keeps
  λ positive when no flip saves anything.
- ``α`` is per sampler: 0.5 suits simulated annealing and steepest descent, 16 tabu.
- ``alpha="hard"`` gives ``λ = max_i (|Q_ii| + 2·Σ_{j≠i}|Q_ij|)`` (times 1 + 1e-6), a
  provable bound: an infeasible x that is D flips from feasibility pays at least λ·D in
  penalty, while repairing it changes xᵀQx by at most D·max_i(...), so every infeasible
  assignment has a higher P than the feasible optimum. The ground state of P is then
  feasible and is the constrained optimum; exact solvers use it.

Everything here works on a dense float64 Q, formed from the factored form when the
problem is small enough (``MAX_DENSE_VARIABLES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qsurgeon.client.errors import ProblemTooLargeError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.base import parse_alpha

#: The largest block whose Q is formed densely (a factored FᵀF + diag(c) is expanded up
#: to here: 2048² float64 = 32 MiB). Penalty samplers need every coupling explicitly.
MAX_DENSE_VARIABLES = 2048
#: Floor on λ₀ as a fraction of the problem's scale (see the module docstring).
_LAMBDA0_FLOOR = 1e-3
_HARD_MARGIN = 1.0 + 1e-6


def dense_matrix(problem: BlockProblem, limit: int = MAX_DENSE_VARIABLES) -> np.ndarray:
    """The problem's Q as a dense float64 matrix, refusing blocks too large to expand."""
    if problem.num_variables > limit:
        kind = "factored" if problem.is_factored else "dense"
        raise ProblemTooLargeError(
            f"{kind} problem of {problem.num_variables} variables is too large for a penalty "
            f"solver's dense QUBO (at most {limit})"
        )
    return problem.dense_Q()


def flip_costs(Q: np.ndarray, x: np.ndarray, fields: np.ndarray | None = None) -> np.ndarray:
    """Energy change of flipping each variable alone: Q_ii + 2·d_i·(Qx)_i with d_i = 1 − 2x_i."""
    fields = Q @ x if fields is None else fields
    direction = 1.0 - 2.0 * x
    return np.diagonal(Q) + 2.0 * direction * fields


def greedy_repair(problem: BlockProblem, Q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Fix every group's count by single flips, each the cheapest that moves a wrong group
    towards its count; returns the feasible assignment and the number of flips made.

    A flip never overshoots (it only adds in groups short of ones and only removes in
    groups with too many), so exactly Σ_g |sum_g − count_g| flips are made.
    """
    x = np.asarray(x, dtype=np.float64).copy()
    deviation = problem.group_sums(x) - problem.counts
    if not deviation.any():
        return x.astype(np.uint8), 0
    fields = Q @ x
    group_of = problem.group_of
    flips = 0
    while True:
        member_deviation = deviation[group_of]
        allowed = ((member_deviation > 0) & (x == 1)) | ((member_deviation < 0) & (x == 0))
        if not allowed.any():
            break
        costs = np.where(allowed, flip_costs(Q, x, fields), np.inf)
        index = int(np.argmin(costs))
        step = 1.0 - 2.0 * x[index]
        x[index] += step
        fields += step * Q[:, index]
        deviation[group_of[index]] += step
        flips += 1
    return x.astype(np.uint8), flips


def greedy_feasible(problem: BlockProblem, Q: np.ndarray) -> np.ndarray:
    """A deterministic feasible assignment: the greedy repair of all zeros."""
    return greedy_repair(problem, Q, np.zeros(problem.num_variables))[0]


def hard_strength(Q: np.ndarray) -> float:
    """The provable λ: max_i (|Q_ii| + 2·Σ_{j≠i}|Q_ij|), the most one flip can change xᵀQx."""
    absolute = np.abs(Q)
    bound = float((2.0 * absolute.sum(axis=1) - np.diagonal(absolute)).max(initial=0.0))
    return bound * _HARD_MARGIN if bound > 0 else 1.0


def largest_flip_saving(problem: BlockProblem, Q: np.ndarray) -> float:
    """λ₀: the largest single-flip energy decrease at the greedy feasible solution (≥ a floor)."""
    x = greedy_feasible(problem, Q).astype(np.float64)
    saving = float(max(0.0, -flip_costs(Q, x).min(initial=0.0)))
    return max(saving, _LAMBDA0_FLOOR * hard_strength(Q))


@dataclass(frozen=True)
class RepairOutcome:
    """The best feasible answer among a sampler's reads, and how feasible the reads were."""

    x: np.ndarray  # (B,) uint8, feasible
    energy: float  # xᵀQx + offset, float64
    raw_feasible_rate: float  # fraction of reads (weighted by occurrences) feasible before repair
    reads: int  # number of reads (sum of occurrences)
    distinct: int  # distinct samples
    repaired: int  # distinct samples that needed repair
    flips: int  # total repair flips over the distinct samples
    best_was_repaired: bool

    def metadata(self) -> dict[str, Any]:
        return {
            "raw_feasible_rate": self.raw_feasible_rate, "reads": self.reads, "distinct_samples": self.distinct,
            "repaired_samples": self.repaired, "repair_flips": self.flips, "best_was_repaired": self.best_was_repaired,
        }


@dataclass(frozen=True)
class PenaltyModel:
    """A block with its constraint as a penalty, scaled for the solver.

    The sampler sees ``P(x)/scale`` (scale = the hard bound, so one flip changes the
    objective part by at most 1): block energies of 1e-4…1e-2 would otherwise sit near the
    float tolerances of some samplers. Energies reported to users are never scaled.
    """

    problem: BlockProblem
    Q: np.ndarray  # dense float64, unscaled
    strength: float  # λ in the problem's own units
    alpha: float | str
    scale: float

    @classmethod
    def build(cls, problem: BlockProblem, alpha: Any, limit: int = MAX_DENSE_VARIABLES) -> "PenaltyModel":
        Q = dense_matrix(problem, limit)
        alpha = parse_alpha(alpha)
        hard = hard_strength(Q)
        strength = hard if alpha == "hard" else float(alpha) * largest_flip_saving(problem, Q)
        return cls(problem=problem, Q=Q, strength=strength, alpha=alpha, scale=hard)

    def penalised_qubo(self) -> tuple[np.ndarray, float]:
        """Symmetric M and offset with xᵀMx + offset = P(x)/scale for every x ∈ {0,1}^B.

        λ(Σ_{i∈g} x_i − c)² = λ·Σ_{i,j∈g} x_i x_j − 2λc·Σ_{i∈g} x_i + λc², and x_i² = x_i puts
        the linear part on the diagonal.
        """
        problem = self.problem
        same_group = problem.group_of[:, None] == problem.group_of[None, :]
        counts_of = problem.counts[problem.group_of].astype(np.float64)
        matrix = self.Q + self.strength * same_group
        matrix[np.diag_indices_from(matrix)] -= 2.0 * self.strength * counts_of
        offset = self.strength * float(np.sum(problem.counts.astype(np.float64) ** 2))
        return matrix / self.scale, offset / self.scale

    def metadata(self) -> dict[str, Any]:
        return {"penalty": self.strength, "penalty_alpha": self.alpha, "qubo_scale": self.scale}

    def repair_and_pick(self, samples: np.ndarray, occurrences: np.ndarray | None = None) -> RepairOutcome:
        """Repair every distinct sample, evaluate true energies in float64, return the best."""
        problem = self.problem
        samples = np.asarray(samples)
        if samples.ndim != 2 or samples.shape[1] != problem.num_variables or samples.shape[0] == 0:
            raise ValueError(f"expected samples of shape (n, {problem.num_variables}), got {samples.shape}")
        occurrences = np.ones(len(samples)) if occurrences is None else np.asarray(occurrences, dtype=np.float64)
        distinct, inverse = np.unique(samples.astype(np.uint8), axis=0, return_inverse=True)
        weights = np.bincount(inverse.reshape(-1), weights=occurrences, minlength=len(distinct))
        sums = distinct.astype(np.float64) @ np.eye(problem.num_groups)[problem.group_of]
        feasible = (sums == problem.counts).all(axis=1)
        repaired = distinct.copy()
        flips = 0
        for row in np.nonzero(~feasible)[0]:
            repaired[row], moved = greedy_repair(problem, self.Q, distinct[row])
            flips += moved
        energies = problem.energies(repaired)
        best = int(np.argmin(energies))
        return RepairOutcome(
            x=repaired[best], energy=float(energies[best]),
            raw_feasible_rate=float(weights[feasible].sum() / weights.sum()), reads=int(round(weights.sum())),
            distinct=len(distinct), repaired=int((~feasible).sum()), flips=flips,
            best_was_repaired=not bool(feasible[best]),
        )
