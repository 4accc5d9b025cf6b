"""Small seeded pruning-like blocks shared by the backend tests (not a test module)."""

from __future__ import annotations

import numpy as np

from qsurgeon.worker.block.problem import BlockProblem


def layerwise_like(num_variables: int, seed: int, *, groups_of: int | None = None, with_x0: bool = True) -> BlockProblem:
    """diag(w)·H·diag(w) with H a Gram matrix of activations, plus a linear term from fixed
    weights outside the block (docs/icbs.md §5): PSD quadratic part, signed diagonal."""
    rng = np.random.default_rng(seed)
    activations = rng.normal(size=(num_variables, 3 * num_variables)) * rng.uniform(0.2, 2.0, size=(num_variables, 1))
    gram = activations @ activations.T / activations.shape[1]
    weights = rng.normal(size=num_variables) * 0.05
    Q = weights[:, None] * gram * weights[None, :]
    Q[np.diag_indices(num_variables)] += 2 * weights * (gram @ rng.normal(size=num_variables) * 0.05) * 0.5
    Q = (Q + Q.T) / 2
    constraint = _constraint(num_variables, groups_of)
    x0 = _feasible_start(rng, num_variables, constraint) if with_x0 else None
    return BlockProblem.dense(Q, **constraint, offset=float(rng.uniform(0, 1e-3)), x0=x0, id=f"layerwise-{num_variables}-{seed}")


def fisher_like(num_variables: int, seed: int, *, rank: int = 4, groups_of: int | None = None) -> BlockProblem:
    """Factored Q = FᵀF + diag(c) with rank ≪ B, as Fisher blocks are (glassy)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=num_variables) * 0.05
    F = rng.normal(size=(rank, num_variables)) * weights[None, :]
    c = -np.abs(weights) * rng.uniform(0, 0.02, size=num_variables)
    constraint = _constraint(num_variables, groups_of)
    return BlockProblem.factored(F, c, **constraint, x0=_feasible_start(rng, num_variables, constraint), id=f"fisher-{num_variables}-{seed}")


def _constraint(num_variables: int, groups_of: int | None) -> dict:
    if groups_of is None:
        return {"k": num_variables // 2}
    labels = np.arange(num_variables) // groups_of
    return {"groups": labels, "counts": np.full(labels.max() + 1, groups_of // 2)}


def _feasible_start(rng: np.random.Generator, num_variables: int, constraint: dict) -> np.ndarray:
    labels = constraint.get("groups", np.zeros(num_variables, np.int64))
    counts = constraint.get("counts", [constraint.get("k")])
    x = np.zeros(num_variables, np.uint8)
    for group, count in enumerate(counts):
        members = np.nonzero(labels == group)[0]
        x[rng.choice(members, size=int(count), replace=False)] = 1
    return x
