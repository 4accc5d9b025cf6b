"""Greedy construction + best-swap descent: the deterministic start of every solver run from scratch.

Why: on real pruning blocks (layer-wise rows with outlier input channels, causal-LM rows) a
random feasible assignment is a very poor start — its energy is dominated by the few
variables whose Q entries are 10–100× the rest, and annealing from it with a schedule
scaled to that state wastes its sweeps (docs/solvers.md, "Robust starts"). A cheap
construction removes that: set variables to one, always the one whose *marginal cost*
``ΔE_i = Q_ii + 2(Qx)_i`` is the lowest among the groups that still need ones, until every
group holds its count; then descend by the best swap (one 1 ↔ one 0 of the same group)
until no swap improves. The result is a 1-swap local optimum with exact counts, found in
O(k·B) + O(steps · Σ_g ones_g·size_g), deterministic (ties go to the lowest index).

Dense blocks use their Q; factored ones (Q = FᵀF + diag(c)) are formed densely in float64
when B ≤ :data:`DENSE_LIMIT` (the descent needs Q_ij), else the insertion runs on the
factors (O(k·B·r)) and the descent is skipped. Dense blocks above the limit are also only
inserted: one descent step scans O(B²) pairs there.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers import group_descent
from qsurgeon.worker.solvers.dense_form import DENSE_LIMIT, dense_matrix, group_order



@njit(cache=True)
def _insert_dense(Q, group_of, counts):
    """Insertion by marginal cost on a dense Q; returns (x, h = Qx in float64)."""
    n = Q.shape[0]
    x = np.zeros(n, np.uint8)
    h = np.zeros(n, np.float64)
    need = counts.astype(np.int64).copy()
    total = 0
    for g in range(need.shape[0]):
        total += need[g]
    for _ in range(total):
        best = np.inf
        pick = -1
        for v in range(n):
            if x[v] or need[group_of[v]] == 0:
                continue
            cost = np.float64(Q[v, v]) + 2.0 * h[v]
            if cost < best:
                best = cost
                pick = v
        x[pick] = 1
        need[group_of[pick]] -= 1
        for v in range(n):
            h[v] += np.float64(Q[pick, v])
    return x, h


@njit(cache=True)
def _insert_factored(FT, c, group_of, counts):
    """Insertion by marginal cost on Q = FᵀF + diag(c) (FT: B × r), O(k·B·r); returns x."""
    n, r = FT.shape
    x = np.zeros(n, np.uint8)
    norms = np.zeros(n, np.float64)
    g = np.zeros(n, np.float64)  # f_v · u with u = F x
    for v in range(n):
        s = 0.0
        for q in range(r):
            s += np.float64(FT[v, q]) * np.float64(FT[v, q])
        norms[v] = s
    need = counts.astype(np.int64).copy()
    total = 0
    for grp in range(need.shape[0]):
        total += need[grp]
    for _ in range(total):
        best = np.inf
        pick = -1
        for v in range(n):
            if x[v] or need[group_of[v]] == 0:
                continue
            cost = np.float64(c[v]) + norms[v] + 2.0 * g[v]
            if cost < best:
                best = cost
                pick = v
        x[pick] = 1
        need[group_of[pick]] -= 1
        for v in range(n):
            s = 0.0
            for q in range(r):
                s += np.float64(FT[v, q]) * np.float64(FT[pick, q])
            g[v] += s
    return x


@njit(cache=True)
def _descend_dense(Q, order, g_begin, x, h, max_steps):
    """Best-swap descent inside groups until no swap lowers the energy; returns the steps taken.

    ``order`` lists the variables group by group (group g is order[g_begin[g]:g_begin[g+1]]).
    A swap (i: 0→1, j: 1→0) changes the energy by d_i + d_j − 2Q_ij with d the single-flip
    deltas. A move must beat a tolerance of 1e-12 of the largest |d| so that rounding in the
    float64 fields can never make the descent cycle.
    """
    n = Q.shape[0]
    d = np.empty(n, np.float64)
    steps = 0
    while steps < max_steps:
        scale = 0.0
        for v in range(n):
            d[v] = np.float64(Q[v, v]) + (2.0 - 4.0 * x[v]) * h[v]
            if abs(d[v]) > scale:
                scale = abs(d[v])
        best = -1e-12 * scale
        bi = -1
        bj = -1
        for grp in range(g_begin.shape[0] - 1):
            for p in range(g_begin[grp], g_begin[grp + 1]):
                j = order[p]
                if not x[j]:
                    continue
                dj = d[j]
                for q in range(g_begin[grp], g_begin[grp + 1]):
                    i = order[q]
                    if x[i]:
                        continue
                    value = dj + d[i] - 2.0 * np.float64(Q[j, i])
                    if value < best:
                        best = value
                        bi = i
                        bj = j
        if bi < 0:
            break
        x[bi] = 1
        x[bj] = 0
        for v in range(n):
            h[v] += np.float64(Q[bi, v]) - np.float64(Q[bj, v])
        steps += 1
    return steps


def greedy_start(problem: BlockProblem, descend: bool = True, max_steps: int | None = None,
                 groups: bool = True) -> np.ndarray:
    """Greedy insertion by marginal cost, then best-swap descent to a 1-swap local optimum.

    On blocks with small groups (N:M; :func:`group_descent.applies`) and ``groups``, group
    descent follows: no single group can then be improved by any of its configurations.

    Returns a uint8 assignment with exactly ``counts[g]`` ones in every group. Deterministic.
    """
    group_of = np.ascontiguousarray(problem.group_of, np.int64)
    counts = np.ascontiguousarray(problem.counts, np.int64)
    Q = dense_matrix(problem)
    if Q is None:
        FT = np.ascontiguousarray(problem.F.T, np.float32)
        return _insert_factored(FT, np.ascontiguousarray(problem.c, np.float32), group_of, counts)
    x, h = _insert_dense(Q, group_of, counts)
    if descend and problem.num_variables <= DENSE_LIMIT:
        order, begin = group_order(problem)
        steps = max_steps if max_steps is not None else 20 * problem.num_variables + 100
        _descend_dense(Q, order, begin, x, h, steps)
        if groups:
            if group_descent.applies(problem):
                x = group_descent.group_descent(problem, x, Q=Q)
    return x


def descend(problem: BlockProblem, x: np.ndarray, max_steps: int | None = None) -> np.ndarray:
    """Best-swap descent from a feasible ``x`` (a copy is returned); for polishing other answers."""
    Q = dense_matrix(problem)
    if Q is None:
        return np.asarray(x, np.uint8).copy()
    x = np.ascontiguousarray(x, np.uint8).copy()
    h = Q.astype(np.float64) @ x.astype(np.float64) if Q.dtype != np.float64 else Q @ x.astype(np.float64)
    order, begin = group_order(problem)
    _descend_dense(Q, order, begin, x, np.ascontiguousarray(h), max_steps or 20 * problem.num_variables + 100)
    return x


def swap_deltas(problem: BlockProblem, x: np.ndarray, samples: int = 1024, seed: int = 0) -> np.ndarray:
    """ΔE of ``samples`` random allowed swaps (one 1 → 0, one 0 → 1 of the same group) at ``x``.

    The pairs come from a generator seeded by ``seed`` alone, so the figure is deterministic;
    used to set the annealing temperature from the state a chain actually starts in. Empty
    when no group allows a swap.
    """
    x = np.asarray(x, np.uint8)
    members = problem.group_members()
    ones = [m[x[m] == 1] for m in members]
    zeros = [m[x[m] == 0] for m in members]
    weights = np.array([o.size * z.size for o, z in zip(ones, zeros)], np.float64)
    if weights.sum() == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(members), size=samples, p=weights / weights.sum())
    j = np.array([ones[g][rng.integers(ones[g].size)] for g in chosen])
    i = np.array([zeros[g][rng.integers(zeros[g].size)] for g in chosen])
    xf = x.astype(np.float64)
    if problem.Q is not None:
        Q = np.asarray(problem.Q)
        h = Q.astype(np.float64) @ xf
        diag = np.diagonal(Q).astype(np.float64)
        cross = Q[i, j].astype(np.float64)
    else:
        F = problem.F.astype(np.float64)
        u = F @ xf
        norms = (F * F).sum(axis=0)
        diag = norms + problem.c.astype(np.float64)
        h = F.T @ u + problem.c.astype(np.float64) * xf
        cross = (F[:, i] * F[:, j]).sum(axis=0)
    d = diag + (2.0 - 4.0 * xf) * h
    return d[i] + d[j] - 2.0 * cross
