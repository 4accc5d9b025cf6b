"""Group-exact moves for blocks with small groups (N:M sparsity).

A swap of one kept and one pruned variable inside a group of 8 is a tiny move: a 4:8 group
has 70 configurations, and a state from which no single swap helps can still be far from
the best configuration of that group given the rest. The *group move* takes one group g,
holds every variable outside it fixed, and sets g to the best of all C(M, N) configurations
with its N ones. With h = Qx, the energy as a function of g's configuration S is

    E(S) = const + Σ_{k∈S} a_k + 2 Σ_{k<l∈S} Q_kl,   a_k = Q_kk + 2 (h_k − Σ_{l∈g} Q_kl x_l),

i.e. the local fields from outside g plus the pairs inside g. ``group descent`` sweeps the
groups in order and takes each group's best configuration until no group changes: a state
where no single group can improve (a much stronger local optimum than one-swap descent,
which it includes). Fields are updated in O(B) per variable that changed.

Only groups with at most :data:`MAX_CONFIGS` configurations are moved (4:8: 70, 2:4: 6);
others — a layer-wise row's single group of 256 — are left as they are, so single-group
blocks are unaffected. The kernel works on a dense Q: dense blocks use their own, factored
ones FᵀF + diag(c) formed in float64 (:func:`dense_form.dense_matrix`, up to B = 4096; above
that nothing is moved). Why dense only: a group move needs Q_kl inside the group and an
update of every field per changed variable; on factors each Q_kl and each field update
costs O(r), and small-group blocks at the sizes where this pays (B ≤ 4096) fit a dense Q.

:func:`group_anneal` (heat-bath annealing over whole groups: each step draws a group's
configuration from its Boltzmann weights) is one of the long reference runs behind
benchmarks/best_known.json; the solvers use group descent only (docs/solvers.md, "The group move").
"""

from __future__ import annotations

from math import comb

import numpy as np
from numba import njit

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.dense_form import DENSE_LIMIT, dense_matrix, group_order

#: A group is moved exactly when it has at most this many configurations (C(size, count)).
MAX_CONFIGS = 256
#: Group descent stops after this many sweeps over the groups even if a group still changes
#: (each change lowers the energy, so this is only a guard against rounding loops).
MAX_SWEEPS = 1000


def eligible_groups(problem: BlockProblem, max_configs: int = MAX_CONFIGS) -> np.ndarray:
    """Which groups the group move enumerates: 0 < count < size and C(size, count) ≤ max_configs."""
    sizes = np.bincount(problem.group_of, minlength=problem.num_groups)
    counts = np.asarray(problem.counts)
    return np.array([0 < int(c) < int(s) and comb(int(s), int(c)) <= max_configs
                     for s, c in zip(sizes, counts)], np.bool_)


def applies(problem: BlockProblem, max_configs: int = MAX_CONFIGS) -> bool:
    """True when the group move can change something on ``problem`` (some small group, B ≤ 4096)."""
    return problem.num_variables <= DENSE_LIMIT and bool(eligible_groups(problem, max_configs).any())


@njit(cache=True)
def _largest_group(g_begin):
    """Size of the largest group (at least 1): the length of the per-group scratch arrays."""
    largest = 1
    for g in range(g_begin.shape[0] - 1):
        largest = max(largest, g_begin[g + 1] - g_begin[g])
    return largest


@njit(cache=True)
def _group_terms(Q, order, begin, end, x, h, members, a):
    """Gather the group's variables into ``members`` and their linear terms into ``a``; returns its ones.

    a[p] = Q_kk + 2·(field of k from outside the group): with every other variable fixed, a
    configuration S of the group costs Σ_{p∈S} a[p] + 2·Σ_{p<q∈S} Q_{k_p k_q} (:func:`_config_value`).
    """
    m = end - begin
    ones = 0
    for p in range(m):
        members[p] = order[begin + p]
        ones += x[members[p]]
    for p in range(m):
        k = members[p]
        inside = 0.0
        for q in range(m):
            inside += np.float64(Q[k, members[q]]) * x[members[q]]
        a[p] = np.float64(Q[k, k]) + 2.0 * (h[k] - inside)
    return ones


@njit(cache=True)
def _config_value(Q, members, a, idx, ones):
    """The group's cost in the configuration idx[:ones] (positions in ``members``), up to a constant."""
    value = 0.0
    for s in range(ones):
        value += a[idx[s]]
        for t in range(s + 1, ones):
            value += 2.0 * np.float64(Q[members[idx[s]], members[idx[t]]])
    return value


@njit(cache=True)
def _next_combination(idx, ones, m):
    """Advance idx[:ones] to the next ones-subset of range(m) in lexicographic order; False after the last."""
    s = ones - 1
    while s >= 0 and idx[s] == m - ones + s:
        s -= 1
    if s < 0:
        return False
    idx[s] += 1
    for t in range(s + 1, ones):
        idx[t] = idx[t - 1] + 1
    return True


@njit(cache=True)
def _best_in_group(Q, order, begin, end, x, h, a, members, idx, best_idx):
    """Best configuration of one group given the rest; returns (gain, ones); best_idx holds it.

    gain = E(current) − E(best) ≥ 0, computed with the same sums for every configuration.
    """
    m = end - begin
    ones = _group_terms(Q, order, begin, end, x, h, members, a)
    scale = 0.0
    for p in range(m):
        if abs(a[p]) > scale:
            scale = abs(a[p])
    # current configuration's value, in the same summation order as the enumeration below
    c = 0
    for p in range(m):
        if x[members[p]]:
            idx[c] = p
            c += 1
    current = _config_value(Q, members, a, idx, ones)
    for s in range(ones):
        best_idx[s] = idx[s]
        idx[s] = s
    best = current
    while True:
        value = _config_value(Q, members, a, idx, ones)
        if value < best - 1e-12 * scale:
            best = value
            for s in range(ones):
                best_idx[s] = idx[s]
        if not _next_combination(idx, ones, m):
            break
    return current - best, ones


@njit(cache=True)
def _set_group(Q, order, begin, end, x, h, best_idx, ones, flags):
    """Set the group to the configuration best_idx[:ones], updating h = Qx; returns variables changed."""
    m = end - begin
    n = Q.shape[0]
    for p in range(m):
        flags[p] = 0
    for s in range(ones):
        flags[best_idx[s]] = 1
    changed = 0
    for p in range(m):
        v = order[begin + p]
        if flags[p] != x[v]:
            sign = 1.0 if flags[p] else -1.0
            x[v] = flags[p]
            for u in range(n):
                h[u] += sign * np.float64(Q[v, u])
            changed += 1
    return changed


@njit(cache=True)
def _descend_groups(Q, order, g_begin, eligible, x, h, max_sweeps):
    """Group descent in place: best configuration of every eligible group until none changes.

    Returns the number of group moves made. A move is taken only when it lowers the group's
    energy by more than 1e-12 of the group's largest linear term, so rounding cannot loop.
    """
    largest = _largest_group(g_begin)
    members = np.empty(largest, np.int64)
    a = np.empty(largest, np.float64)
    idx = np.empty(largest, np.int64)
    best_idx = np.empty(largest, np.int64)
    flags = np.empty(largest, np.uint8)
    moves = 0
    for _ in range(max_sweeps):
        changed = False
        for g in range(g_begin.shape[0] - 1):
            if not eligible[g]:
                continue
            gain, ones = _best_in_group(Q, order, g_begin[g], g_begin[g + 1], x, h, a, members, idx, best_idx)
            if gain > 0.0:
                if _set_group(Q, order, g_begin[g], g_begin[g + 1], x, h, best_idx, ones, flags) > 0:
                    changed = True
                    moves += 1
        if not changed:
            break
    return moves


def _prepare(problem: BlockProblem, Q: np.ndarray | None):
    if problem.num_variables > DENSE_LIMIT:
        return None
    eligible = eligible_groups(problem)
    if not eligible.any():
        return None
    Q = dense_matrix(problem) if Q is None else Q
    if Q is None:
        return None
    order, begin = group_order(problem)
    return np.ascontiguousarray(Q), order, begin, eligible


def group_descent(problem: BlockProblem, x: np.ndarray, Q: np.ndarray | None = None,
                  max_sweeps: int = MAX_SWEEPS) -> np.ndarray:
    """Group descent from a feasible ``x`` (a copy is returned; ``x`` itself when nothing applies).

    ``Q``: the dense matrix to use (default :func:`dense_form.dense_matrix`). Deterministic.
    """
    prepared = _prepare(problem, Q)
    x = np.ascontiguousarray(x, np.uint8).copy()
    if prepared is None:
        return x
    Q, order, begin, eligible = prepared
    h = np.asarray(Q, np.float64) @ x.astype(np.float64)
    _descend_groups(Q, order, begin, eligible, x, np.ascontiguousarray(h), max_sweeps)
    return x


def polish_states(problem: BlockProblem, states: np.ndarray) -> np.ndarray:
    """Group descent from every row of ``states`` (R × B); rows not improved (re-scored) are kept as given.

    The result is never worse than ``states`` row by row in ``problem.energies`` (float64).
    """
    states = np.asarray(states, np.uint8)
    prepared = _prepare(problem, None)
    if prepared is None:
        return states
    Q, order, begin, eligible = prepared
    polished = np.ascontiguousarray(states).copy()
    for row in polished:
        h = np.asarray(Q, np.float64) @ row.astype(np.float64)
        _descend_groups(Q, order, begin, eligible, row, np.ascontiguousarray(h), MAX_SWEEPS)
    worse = problem.energies(polished) > problem.energies(states)
    polished[worse] = states[worse]
    return polished


@njit(cache=True)
def _anneal_groups(Q, order, g_begin, eligible_list, x, key, betas, scale):
    """Heat-bath annealing over whole groups (in place: x ends as the best state seen).

    Each step draws one eligible group's configuration from its Boltzmann distribution
    given the rest, exp(−β·E(S)) over all C(M, N) configurations, with β = betas[sweep] / scale.
    """
    np.random.seed(key)
    n = Q.shape[0]
    h = np.empty(n, np.float64)
    for u in range(n):
        s = 0.0
        for v in range(n):
            if x[v]:
                s += np.float64(Q[u, v])
        h[u] = s
    largest = _largest_group(g_begin)
    members = np.empty(largest, np.int64)
    a = np.empty(largest, np.float64)
    idx = np.empty(largest, np.int64)
    flags = np.empty(largest, np.uint8)
    configs = np.empty((MAX_CONFIGS, largest), np.int64)
    values = np.empty(MAX_CONFIGS, np.float64)
    energy = 0.0
    best_energy = 0.0
    best = x.copy()
    for sweep in range(betas.shape[0]):
        beta = betas[sweep] / scale
        for gi in range(eligible_list.shape[0]):
            g = eligible_list[gi]
            begin = g_begin[g]
            m = g_begin[g + 1] - begin
            ones = _group_terms(Q, order, begin, g_begin[g + 1], x, h, members, a)
            current = 0.0
            for p in range(m):
                if x[members[p]]:
                    current += a[p]
                    for q in range(p + 1, m):
                        if x[members[q]]:
                            current += 2.0 * np.float64(Q[members[p], members[q]])
            for s in range(ones):
                idx[s] = s
            count = 0
            low = np.inf
            while True:
                value = _config_value(Q, members, a, idx, ones)
                values[count] = value
                for s in range(ones):
                    configs[count, s] = idx[s]
                if value < low:
                    low = value
                count += 1
                if not _next_combination(idx, ones, m):
                    break
            total = 0.0
            for c in range(count):
                values[c] = np.exp(-beta * (values[c] - low)) if beta * (values[c] - low) < 700.0 else 0.0
                total += values[c]
            r = np.random.random() * total
            pick = count - 1
            acc = 0.0
            for c in range(count):
                acc += values[c]
                if r < acc:
                    pick = c
                    break
            new_value = _config_value(Q, members, a, configs[pick], ones)
            for p in range(m):
                flags[p] = 0
            for s in range(ones):
                flags[configs[pick, s]] = 1
            for p in range(m):
                v = members[p]
                if flags[p] != x[v]:
                    sign = 1.0 if flags[p] else -1.0
                    x[v] = flags[p]
                    for u in range(n):
                        h[u] += sign * np.float64(Q[v, u])
            energy += new_value - current
            if energy < best_energy:
                best_energy = energy
                for u in range(n):
                    best[u] = x[u]
    for u in range(n):
        x[u] = best[u]
    return best_energy


def group_anneal(problem: BlockProblem, x: np.ndarray, key: int, sweeps: int,
                 beta_range: tuple[float, float] = (2.0, 100.0), scale: float = 1.0) -> np.ndarray:
    """Heat-bath annealing over whole eligible groups from ``x``, then group descent; the best state seen."""
    x = np.ascontiguousarray(x, np.uint8)
    prepared = _prepare(problem, None)
    if prepared is None:
        return x.copy()
    Q, order, begin, eligible = prepared
    y = x.copy()
    betas = np.geomspace(beta_range[0], beta_range[1], max(sweeps, 1))[:sweeps].astype(np.float64)
    _anneal_groups(Q, order, begin, np.flatnonzero(eligible).astype(np.int64), y, np.int64(key % (2**31)),
                   betas, float(scale))
    h = np.asarray(Q, np.float64) @ y.astype(np.float64)
    _descend_groups(Q, order, begin, eligible, y, np.ascontiguousarray(h), MAX_SWEEPS)
    return y if problem.energy(y) <= problem.energy(x) else x.copy()
