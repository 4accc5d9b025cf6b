"""The dense form of a block and its variables in group order: what the local searches share.

The greedy construction, its swap descent and the N:M group descent all scan Q_ij and walk
the variables group by group. Both live here so those modules import one place and not
each other.
"""

from __future__ import annotations

import numpy as np

from qsurgeon.worker.block.problem import BlockProblem

#: Largest block a local search forms densely and descends (one swap-descent step scans up to
#: B²/4 pairs; a factored block of 4096 variables formed in float64 is 128 MiB).
DENSE_LIMIT = 4096


def dense_matrix(problem: BlockProblem) -> np.ndarray | None:
    """The Q a local search works on: the block's own, a factored one formed in float64, or None (too large)."""
    if problem.Q is not None:
        return np.asarray(problem.Q)
    if problem.num_variables > DENSE_LIMIT:
        return None
    F = problem.F.astype(np.float64)
    Q = F.T @ F
    Q = (Q + Q.T) * 0.5
    Q[np.diag_indices_from(Q)] += problem.c.astype(np.float64)
    return Q


def group_order(problem: BlockProblem) -> tuple[np.ndarray, np.ndarray]:
    """Variables sorted by group (stable) and where each group begins: group g is order[begin[g]:begin[g+1]]."""
    order = np.argsort(problem.group_of, kind="stable").astype(np.int64)
    sizes = np.bincount(problem.group_of, minlength=problem.num_groups)
    begin = np.zeros(problem.num_groups + 1, np.int64)
    begin[1:] = np.cumsum(sizes)
    return order, begin
