"""Compiled CPU kernels of the ``sa`` solver (numba), vectorised over problems × restarts.

A batch is flattened into a few concatenated arrays (every problem's Q, or Fᵀ and c,
back to back, plus its constraint layout), and one ``prange`` runs every (problem,
restart) chain of the batch on its own. A chain keeps

- ``slot``: the variables of each group laid out as [ones | zeros], so a swap proposal
  is two random slot indices of one group, O(1), with no rejection;
- ``h = Qx`` (dense) or ``u = Fx`` (factored) in float64, so ΔE costs O(1) or O(r) and
  only an accepted move pays the O(B) or O(r) update;
- its running energy and the best state it has visited.

Fields are float64 sums of float32 matrix entries, which are exact to ~1e-16, so the
running energy cannot drift into a false "best" even though block energies are tiny.
The random numbers follow :mod:`sa_rng` (counter-based), so a chain's path depends on
its key alone; the state survives between calls, so a run can be cut into chunks of
sweeps (for ``time_limit``) without changing its answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.block.stack import flat_matrices
from qsurgeon.worker.solvers.base import time_share

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_U11 = np.uint64(11)
_U27 = np.uint64(27)
_U30 = np.uint64(30)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_SCALE_SAMPLES = 256
_MAX_BETA_DELTA = 40.0
_INV_2_53 = 1.0 / 9007199254740992.0

#: Upper bound on the matrix bytes copied into one kernel call; bigger batches run in parts.
MAX_BYTES_PER_CALL = 256 << 20


# ---------------------------------------------------------------------- random numbers
@njit(cache=True, inline="always")
def _draw(key, counter):
    z = key + np.uint64(counter) * _GAMMA
    z = (z ^ (z >> _U30)) * _MIX1
    z = (z ^ (z >> _U27)) * _MIX2
    return z ^ (z >> _U31)


@njit(cache=True, inline="always")
def _below(bits32, n):
    """A number in 0..n-1 from 32 random bits (multiply-shift; n < 2^31)."""
    return np.int64((bits32 * np.uint64(n)) >> _U32)


@njit(cache=True, inline="always")
def _uniform(bits):
    return (np.float64(bits >> _U11) + 0.5) * _INV_2_53


@njit(cache=True, inline="always")
def _pick(key, t, nsw, sw_base, sw_groups, grp_base, g_start, g_size, g_count):
    """Slot of a one (``a``) and slot of a zero (``b``) in one random swappable group."""
    r = _draw(key, 3 * t)
    if nsw == 1:
        group = sw_groups[sw_base]
    else:
        group = sw_groups[sw_base + _below(_draw(key, 3 * t + 2) >> _U32, nsw)]
    index = grp_base + group
    ones = g_count[index]
    a = g_start[index] + _below(r >> _U32, ones)
    b = g_start[index] + ones + _below(r & _LOW32, g_size[index] - ones)
    return a, b


# ---------------------------------------------------------------------- start states
@njit(cache=True)
def _start_state(n, vo, co, use_x0, x0, var_group, grp_base, num_groups, g_start, g_count, key, x, slot):
    """Fill x (from x0 or random feasible) and the [ones | zeros] slot layout of each group.

    A random start gives each group's ``count`` variables with the smallest random keys a
    one; ties in the 32-bit keys fall back to the variable index (stable sort).
    """
    if use_x0:
        for v in range(n):
            x[co + v] = x0[vo + v]
    else:
        composite = np.empty(n, np.int64)
        for v in range(n):
            composite[v] = (np.int64(var_group[vo + v]) << 32) | np.int64(_draw(key, v) >> _U32)
        order = np.argsort(composite, kind="mergesort")
        taken = np.zeros(num_groups, np.int64)
        for position in range(n):
            v = order[position]
            group = var_group[vo + v]
            if taken[group] < g_count[grp_base + group]:
                x[co + v] = 1
                taken[group] += 1
            else:
                x[co + v] = 0
    next_one = np.empty(num_groups, np.int64)
    next_zero = np.empty(num_groups, np.int64)
    for group in range(num_groups):
        next_one[group] = g_start[grp_base + group]
        next_zero[group] = g_start[grp_base + group] + g_count[grp_base + group]
    for v in range(n):
        group = var_group[vo + v]
        if x[co + v]:
            slot[co + next_one[group]] = v
            next_one[group] += 1
        else:
            slot[co + next_zero[group]] = v
            next_zero[group] += 1


@njit(cache=True)
def _median_scale(deltas):
    """Median |ΔE| of the sampled swaps; falls back to the mean, then to 1, when zero."""
    magnitudes = np.sort(np.abs(deltas))
    half = magnitudes.shape[0] // 2
    scale = 0.5 * (magnitudes[half - 1] + magnitudes[half])
    if scale > 0.0:
        return scale
    mean = magnitudes.mean()
    return mean if mean > 0.0 else 1.0


# ---------------------------------------------------------------------- dense problems
@njit(cache=True, inline="always")
def _delta_dense(Q, qo, n, diag, vo, h, co, i, j):
    """ΔE of x_i: 0→1, x_j: 1→0 from the local fields h = Qx (diag: Q's diagonal, contiguous)."""
    return 2.0 * h[co + i] + diag[vo + i] - 2.0 * h[co + j] + diag[vo + j] - 2.0 * np.float64(Q[qo + i * n + j])


@njit(parallel=True, cache=True)
def init_dense(Q, diag, q_off, nvar, var_off, var_group, x0, grp_off, ngrp, g_start, g_size, g_count,
               sw_off, nsw, sw_groups, chain_problem, chain_var_off, chain_use_x0, key_start, key_scale,
               x, best_x, slot, h, energy, best_energy, scale):
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        n = nvar[p]
        vo = var_off[p]
        co = chain_var_off[c]
        qo = q_off[p]
        _start_state(n, vo, co, chain_use_x0[c], x0, var_group, grp_off[p], ngrp[p], g_start, g_count,
                     key_start[c], x, slot)
        total = 0.0
        for v in range(n):
            field = 0.0
            row = qo + v * n
            for u in range(n):
                if x[co + u]:
                    field += Q[row + u]
            h[co + v] = field
            if x[co + v]:
                total += field
        energy[c] = total
        best_energy[c] = total
        for v in range(n):
            best_x[co + v] = x[co + v]
        if nsw[p] == 0:
            scale[c] = 1.0
            continue
        deltas = np.empty(_SCALE_SAMPLES, np.float64)
        for m in range(_SCALE_SAMPLES):
            a, b = _pick(key_scale[c], m, nsw[p], sw_off[p], sw_groups, grp_off[p], g_start, g_size, g_count)
            deltas[m] = _delta_dense(Q, qo, n, diag, vo, h, co, slot[co + b], slot[co + a])
        scale[c] = _median_scale(deltas)


@njit(parallel=True, cache=True)
def anneal_dense(Q, diag, q_off, nvar, var_off, grp_off, g_start, g_size, g_count, sw_off, nsw, sw_groups,
                 chain_problem, chain_var_off, chain_beta_row, key_run, betas, scale, sweep_begin, sweep_end,
                 x, best_x, slot, h, energy, best_energy, accepted):
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        if nsw[p] == 0:
            continue
        n = nvar[p]
        vo = var_off[p]
        co = chain_var_off[c]
        qo = q_off[p]
        key = key_run[c]
        current = energy[c]
        best = best_energy[c]
        at_best = False  # best_x already holds the best state until a move beats it
        moves = 0
        for sweep in range(sweep_begin, sweep_end):
            beta = betas[chain_beta_row[c], sweep] / scale[c]
            for step in range(n):
                t = sweep * n + step
                a, b = _pick(key, t, nsw[p], sw_off[p], sw_groups, grp_off[p], g_start, g_size, g_count)
                j = slot[co + a]
                i = slot[co + b]
                delta = _delta_dense(Q, qo, n, diag, vo, h, co, i, j)
                if delta > 0.0:
                    exponent = beta * delta
                    if exponent > _MAX_BETA_DELTA:
                        continue
                    if _uniform(_draw(key, 3 * t + 1)) >= np.exp(-exponent):
                        continue
                if at_best and delta > 0.0:  # climbing out of the best state seen: keep a copy
                    for v in range(n):
                        best_x[co + v] = x[co + v]
                    at_best = False
                slot[co + a] = i
                slot[co + b] = j
                x[co + i] = 1
                x[co + j] = 0
                row_i = qo + i * n
                row_j = qo + j * n
                for v in range(n):
                    h[co + v] += np.float64(Q[row_i + v]) - np.float64(Q[row_j + v])
                current += delta
                moves += 1
                if current < best:  # invariant: at_best implies current == best
                    best = current
                    at_best = True
        if at_best:
            for v in range(n):
                best_x[co + v] = x[co + v]
        energy[c] = current
        best_energy[c] = best
        accepted[c] += moves


# ---------------------------------------------------------------------- factored problems
@njit(cache=True, inline="always")
def _delta_factored(FT, fo, rank, c_diag, vo, u, uo, i, j):
    """ΔE = 2u·(f_i − f_j) + ||f_i − f_j||² + c_i − c_j, in O(r)."""
    fi = fo + i * rank
    fj = fo + j * rank
    total = 0.0
    for k in range(rank):
        d = np.float64(FT[fi + k]) - np.float64(FT[fj + k])
        total += d * (2.0 * u[uo + k] + d)
    return total + np.float64(c_diag[vo + i]) - np.float64(c_diag[vo + j])


@njit(parallel=True, cache=True)
def init_factored(FT, f_off, rank, c_diag, nvar, var_off, var_group, x0, grp_off, ngrp, g_start, g_size, g_count,
                  sw_off, nsw, sw_groups, chain_problem, chain_var_off, chain_rank_off, chain_use_x0,
                  key_start, key_scale, x, best_x, slot, u, energy, best_energy, scale):
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        n = nvar[p]
        r = rank[p]
        vo = var_off[p]
        co = chain_var_off[c]
        uo = chain_rank_off[c]
        fo = f_off[p]
        _start_state(n, vo, co, chain_use_x0[c], x0, var_group, grp_off[p], ngrp[p], g_start, g_count,
                     key_start[c], x, slot)
        for k in range(r):
            u[uo + k] = 0.0
        diagonal = 0.0
        for v in range(n):
            if x[co + v]:
                for k in range(r):
                    u[uo + k] += FT[fo + v * r + k]
                diagonal += c_diag[vo + v]
        total = 0.0
        for k in range(r):
            total += u[uo + k] * u[uo + k]
        total += diagonal
        energy[c] = total
        best_energy[c] = total
        for v in range(n):
            best_x[co + v] = x[co + v]
        if nsw[p] == 0:
            scale[c] = 1.0
            continue
        deltas = np.empty(_SCALE_SAMPLES, np.float64)
        for m in range(_SCALE_SAMPLES):
            a, b = _pick(key_scale[c], m, nsw[p], sw_off[p], sw_groups, grp_off[p], g_start, g_size, g_count)
            deltas[m] = _delta_factored(FT, fo, r, c_diag, vo, u, uo, slot[co + b], slot[co + a])
        scale[c] = _median_scale(deltas)


@njit(parallel=True, cache=True)
def anneal_factored(FT, f_off, rank, c_diag, nvar, var_off, grp_off, g_start, g_size, g_count, sw_off, nsw,
                    sw_groups, chain_problem, chain_var_off, chain_rank_off, chain_beta_row, key_run, betas, scale,
                    sweep_begin, sweep_end, x, best_x, slot, u, energy, best_energy, accepted):
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        if nsw[p] == 0:
            continue
        n = nvar[p]
        r = rank[p]
        vo = var_off[p]
        co = chain_var_off[c]
        uo = chain_rank_off[c]
        fo = f_off[p]
        key = key_run[c]
        current = energy[c]
        best = best_energy[c]
        at_best = False  # best_x already holds the best state until a move beats it
        moves = 0
        for sweep in range(sweep_begin, sweep_end):
            beta = betas[chain_beta_row[c], sweep] / scale[c]
            for step in range(n):
                t = sweep * n + step
                a, b = _pick(key, t, nsw[p], sw_off[p], sw_groups, grp_off[p], g_start, g_size, g_count)
                j = slot[co + a]
                i = slot[co + b]
                delta = _delta_factored(FT, fo, r, c_diag, vo, u, uo, i, j)
                if delta > 0.0:
                    exponent = beta * delta
                    if exponent > _MAX_BETA_DELTA:
                        continue
                    if _uniform(_draw(key, 3 * t + 1)) >= np.exp(-exponent):
                        continue
                if at_best and delta > 0.0:  # climbing out of the best state seen: keep a copy
                    for v in range(n):
                        best_x[co + v] = x[co + v]
                    at_best = False
                slot[co + a] = i
                slot[co + b] = j
                x[co + i] = 1
                x[co + j] = 0
                fi = fo + i * r
                fj = fo + j * r
                for k in range(r):
                    u[uo + k] += np.float64(FT[fi + k]) - np.float64(FT[fj + k])
                current += delta
                moves += 1
                if current < best:  # invariant: at_best implies current == best
                    best = current
                    at_best = True
        if at_best:
            for v in range(n):
                best_x[co + v] = x[co + v]
        energy[c] = current
        best_energy[c] = best
        accepted[c] += moves


# ---------------------------------------------------------------------- packing and driving
@dataclass
class ChainResults:
    """What the kernels hand back for one problem: one row per restart."""

    best_x: np.ndarray  # (restarts, B) uint8
    kernel_energy: np.ndarray  # (restarts,) float64, the kernel's running figure (without offset)
    accepted: np.ndarray  # (restarts,) int64
    scale: np.ndarray  # (restarts,) float64, the median |ΔE| that made β dimensionless
    sweeps_done: int


def _constraint_layout(problems: list[BlockProblem], use_x0: np.ndarray) -> dict[str, np.ndarray]:
    """Flat per-problem constraint arrays shared by both kernels (and swap-tabu's): any problem
    with ``num_variables``, ``num_groups``, ``group_of``, ``counts`` and ``x0`` will do."""
    nvar = np.array([p.num_variables for p in problems], np.int64)
    ngrp = np.array([p.num_groups for p in problems], np.int64)
    var_off = np.zeros(len(problems), np.int64)
    var_off[1:] = np.cumsum(nvar)[:-1]
    grp_off = np.zeros(len(problems), np.int64)
    grp_off[1:] = np.cumsum(ngrp)[:-1]
    var_group = np.concatenate([p.group_of for p in problems]).astype(np.int64)
    x0 = np.concatenate([
        p.x0 if (flag and p.x0 is not None) else np.zeros(p.num_variables, np.uint8)
        for p, flag in zip(problems, use_x0)
    ]).astype(np.uint8)
    sizes = [np.bincount(p.group_of, minlength=p.num_groups).astype(np.int64) for p in problems]
    g_size = np.concatenate(sizes)
    g_count = np.concatenate([p.counts for p in problems]).astype(np.int64)
    g_start = np.concatenate([np.concatenate(([0], np.cumsum(s)[:-1])) for s in sizes]).astype(np.int64)
    swappable = [np.nonzero((p.counts > 0) & (p.counts < s))[0].astype(np.int64) for p, s in zip(problems, sizes)]
    nsw = np.array([s.shape[0] for s in swappable], np.int64)
    sw_off = np.zeros(len(problems), np.int64)
    sw_off[1:] = np.cumsum(nsw)[:-1]
    sw_groups = np.concatenate(swappable + [np.zeros(1, np.int64)]).astype(np.int64)
    return dict(nvar=nvar, var_off=var_off, var_group=var_group, x0=x0, grp_off=grp_off, ngrp=ngrp,
                g_start=g_start, g_size=g_size, g_count=g_count, sw_off=sw_off, nsw=nsw, sw_groups=sw_groups)


def next_chunk(sweeps_left: int, sweeps_done: int, seconds_so_far: float, deadline: float | None) -> int:
    """How many sweeps to run before looking at the clock again (all of them without a limit)."""
    if deadline is None:
        return sweeps_left
    if sweeps_done == 0:
        return max(1, min(sweeps_left, 8))
    seconds_per_sweep = max(seconds_so_far / sweeps_done, 1e-9)
    remaining = deadline - time.perf_counter()
    target = max(remaining / 4.0, 0.002)  # look at the clock a few times before the end
    return max(1, min(sweeps_left, int(target / seconds_per_sweep)))


def override_scales(scale: np.ndarray, scales: np.ndarray | None, restarts: int) -> None:
    """Replace the kernel's median-|ΔE| scale of every chain whose problem comes with its own (finite) one."""
    if scales is None:
        return
    per_chain = np.repeat(np.asarray(scales, np.float64), restarts)
    given = np.isfinite(per_chain)
    scale[given] = per_chain[given]


def _run_part(problems: list[BlockProblem], keys: np.ndarray, use_x0: np.ndarray, beta_rows: np.ndarray,
              betas: np.ndarray, deadline: float | None, scales: np.ndarray | None = None) -> list[ChainResults]:
    """Run every chain of a part of the batch whose problems are all dense or all factored."""
    restarts = keys.shape[1]
    layout = _constraint_layout(problems, use_x0)
    num_problems = len(problems)
    chain_problem = np.repeat(np.arange(num_problems, dtype=np.int64), restarts)
    chain_sizes = layout["nvar"][chain_problem]
    chain_var_off = np.zeros(chain_problem.shape[0], np.int64)
    chain_var_off[1:] = np.cumsum(chain_sizes)[:-1]
    chain_use_x0 = np.repeat(use_x0.astype(np.bool_), restarts)
    chain_beta_row = np.repeat(beta_rows.astype(np.int64), restarts)
    key_start = np.ascontiguousarray(keys[:, :, 0].reshape(-1))
    key_scale = np.ascontiguousarray(keys[:, :, 1].reshape(-1))
    key_run = np.ascontiguousarray(keys[:, :, 2].reshape(-1))
    total_vars = int(chain_sizes.sum())
    num_chains = chain_problem.shape[0]
    x = np.zeros(total_vars, np.uint8)
    best_x = np.zeros(total_vars, np.uint8)
    slot = np.zeros(total_vars, np.int64)
    energy = np.zeros(num_chains, np.float64)
    best_energy = np.zeros(num_chains, np.float64)
    scale = np.ones(num_chains, np.float64)
    accepted = np.zeros(num_chains, np.int64)
    L = layout
    factored = problems[0].is_factored
    if factored:
        rank = np.array([p.rank for p in problems], np.int64)
        f_off = np.zeros(num_problems, np.int64)
        f_off[1:] = np.cumsum(rank * L["nvar"])[:-1]
        FT = np.concatenate([np.ascontiguousarray(p.F.T).reshape(-1) for p in problems]).astype(np.float32)
        c_diag = np.concatenate([p.c for p in problems]).astype(np.float32)
        chain_rank = rank[chain_problem]
        chain_rank_off = np.zeros(num_chains, np.int64)
        chain_rank_off[1:] = np.cumsum(chain_rank)[:-1]
        fields = np.zeros(max(int(chain_rank.sum()), 1), np.float64)
        init_factored(FT, f_off, rank, c_diag, L["nvar"], L["var_off"], L["var_group"], L["x0"], L["grp_off"],
                      L["ngrp"], L["g_start"], L["g_size"], L["g_count"], L["sw_off"], L["nsw"], L["sw_groups"],
                      chain_problem, chain_var_off, chain_rank_off, chain_use_x0, key_start, key_scale,
                      x, best_x, slot, fields, energy, best_energy, scale)

        def run(begin: int, end: int) -> None:
            anneal_factored(FT, f_off, rank, c_diag, L["nvar"], L["var_off"], L["grp_off"], L["g_start"],
                            L["g_size"], L["g_count"], L["sw_off"], L["nsw"], L["sw_groups"], chain_problem,
                            chain_var_off, chain_rank_off, chain_beta_row, key_run, betas, scale, begin, end,
                            x, best_x, slot, fields, energy, best_energy, accepted)
    else:
        q_off = np.zeros(num_problems, np.int64)
        q_off[1:] = np.cumsum(L["nvar"] * L["nvar"])[:-1]
        Q = flat_matrices(problems)  # in place for a MatrixStack's views (block/stack.py)
        diag = np.concatenate([np.diagonal(p.Q).astype(np.float64) for p in problems])
        fields = np.zeros(total_vars, np.float64)
        init_dense(Q, diag, q_off, L["nvar"], L["var_off"], L["var_group"], L["x0"], L["grp_off"], L["ngrp"],
                   L["g_start"], L["g_size"], L["g_count"], L["sw_off"], L["nsw"], L["sw_groups"], chain_problem,
                   chain_var_off, chain_use_x0, key_start, key_scale, x, best_x, slot, fields, energy,
                   best_energy, scale)

        def run(begin: int, end: int) -> None:
            anneal_dense(Q, diag, q_off, L["nvar"], L["var_off"], L["grp_off"], L["g_start"], L["g_size"], L["g_count"], L["sw_off"],
                         L["nsw"], L["sw_groups"], chain_problem, chain_var_off, chain_beta_row, key_run, betas,
                         scale, begin, end, x, best_x, slot, fields, energy, best_energy, accepted)

    override_scales(scale, scales, restarts)
    total_sweeps = betas.shape[1]
    done = 0
    started = time.perf_counter()
    while done < total_sweeps:
        if deadline is not None and done > 0 and time.perf_counter() >= deadline:
            break
        chunk = next_chunk(total_sweeps - done, done, time.perf_counter() - started, deadline)
        run(done, done + chunk)
        done += chunk
    results = []
    for index in range(num_problems):
        chains = slice(index * restarts, (index + 1) * restarts)
        start = int(chain_var_off[index * restarts])
        size = int(L["nvar"][index])
        results.append(ChainResults(
            best_x=best_x[start : start + restarts * size].reshape(restarts, size).copy(),
            kernel_energy=best_energy[chains].copy(), accepted=accepted[chains].copy(),
            scale=scale[chains].copy(), sweeps_done=done,
        ))
    return results


def _matrix_bytes(problem: BlockProblem) -> int:
    return 4 * (problem.Q.size if problem.Q is not None else problem.F.size + problem.c.size)


def run_batch(problems: list[BlockProblem], keys: np.ndarray, use_x0: np.ndarray, beta_rows: np.ndarray,
              betas: np.ndarray, time_limit: float | None, scales: np.ndarray | None = None) -> list[ChainResults]:
    """Anneal every problem of a batch on the CPU; returns one ChainResults per problem.

    scales: (P,) energy scale per problem, NaN where the kernel's own median |ΔE| applies.

    keys: (P, restarts, 3) uint64; use_x0: (P,) bool; beta_rows: (P,) row of ``betas``
    (rows × sweeps, dimensionless β) each problem follows. Dense and factored problems run
    in separate kernel calls, and a batch whose matrices exceed MAX_BYTES_PER_CALL runs in
    parts; a time limit is shared among the parts in proportion to their work.
    """
    parts: list[list[int]] = []
    for factored in (False, True):
        current: list[int] = []
        current_bytes = 0
        for index, problem in enumerate(problems):
            if problem.is_factored != factored:
                continue
            size = _matrix_bytes(problem)
            if current and current_bytes + size > MAX_BYTES_PER_CALL:
                parts.append(current)
                current, current_bytes = [], 0
            current.append(index)
            current_bytes += size
        if current:
            parts.append(current)
    work = [sum(problems[i].num_variables * (problems[i].rank or problems[i].num_variables) for i in part)
            for part in parts]
    results: list[ChainResults | None] = [None] * len(problems)
    started = time.perf_counter()
    for position, part in enumerate(parts):
        share = time_share(time_limit, started, work, position)
        deadline = None if share is None else time.perf_counter() + share
        answers = _run_part([problems[i] for i in part], keys[part], use_x0[part], beta_rows[part], betas, deadline,
                            None if scales is None else np.asarray(scales)[part])
        for index, answer in zip(part, answers):
            results[index] = answer
    return results  # type: ignore[return-value]
