"""Compiled CPU kernel of the ``swap-tabu`` solver (numba), over problems × restarts.

Each chain (one restart of one problem) runs a tabu search whose move is the *best* swap
of one kept and one pruned variable of the same group. The kernel keeps, per chain,

- ``h = Qx`` in float64 and the single-flip deltas ``d`` (``d_v = Q_vv ± 2 h_v``), so the
  energy change of the swap (i in, j out) is ``d_i + d_j − 2 Q_ij``: O(1) per pair, and the
  whole neighbourhood (every one × every zero of every group) costs O(Σ_g ones_g · size_g);
- ``tabu_until``: the iteration until which a variable may not move again (a variable that
  left may not come back, one that came in may not leave); a tabu move is still taken when
  it would beat the best energy of the chain (aspiration);
- the best state visited and its energy.

Variables are renumbered so that every group is a contiguous range, and each chain keeps
the [ones | zeros] slot layout of every group (as ``sa`` does). Small groups (N:M) are
scanned pair by pair; large ones in the order of a lower bound on ΔE, which skips the pairs
that cannot beat the best found so far (see :func:`_scan_pruned`). All random numbers (the
random start, the tenures) come from :func:`sa_cpu._draw` on the chain's key and the
iteration number, and the state lives in arrays between calls, so a run cut
into chunks for ``time_limit`` takes the same path as one uncut run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from qsurgeon.worker.solvers.base import time_share
from qsurgeon.worker.solvers.sa_cpu import MAX_BYTES_PER_CALL, _below, _constraint_layout, _draw, _pick, _start_state

#: Stands for "no move found yet".
BIG = 1e300
#: Groups up to this size are scanned pair by pair; larger ones in bound-pruned order.
SMALL_GROUP = 32
#: A column is heavy when its largest entry exceeds HEAVY_FACTOR × the median column's; at most
#: B / HEAVY_SHARE columns are (rows with outlier input channels: ~2 % of the channels, 10–30×).
HEAVY_FACTOR = 4.0
HEAVY_SHARE = 16
_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
#: Salt of the kicks' random stream (the tenures draw from the chain key itself).
_KICK_SALT = np.uint64(0x6B69636B5F737470)
#: The move of an iteration (KernelProblem.move): the best swap of the whole neighbourhood (:func:`_best_swap`),
#: or a drop then an add (:func:`_drop_add`); ``swap_tabu.MOVE_DEFAULTS`` names them.
MOVE_BEST = 0
MOVE_DROP_ADD = 1


@njit(cache=True)
def _refresh(diag, vo, n, co, x, h, d):
    """Single-flip deltas: d_v = Q_vv + 2h_v for a zero (0→1), Q_vv − 2h_v for a one (1→0)."""
    for v in range(n):
        d[co + v] = diag[vo + v] + (2.0 - 4.0 * x[co + v]) * h[co + v]


@njit(cache=True, inline="always")
def _allowed(tabu_until, co, i, j, it, value, current, best):
    """Neither variable tabu, or the move makes a new best state (aspiration)."""
    return (tabu_until[co + i] <= it and tabu_until[co + j] <= it) or current + value < best


@njit(cache=True)
def _scan_small(Q, qo, n, co, slot, d, tabu_until, it, current, best, begin, count, end, found):
    """Every (one, zero) pair of a small group; ``found`` = [value, i, j] is improved in place.

    The pairs are read from the group's [ones | zeros] slots (count × (size − count) of them, no
    test of x per pair: this scan is most of an iteration's cost on N:M blocks). Ties go to the
    lowest (j, i), as if the pairs were visited in index order, so the order inside the slots
    does not change the move taken.
    """
    ones_begin = co + begin
    zeros_begin = ones_begin + count
    zeros_end = co + end
    limit = found[0]
    local = BIG
    local_i = -1
    local_j = -1
    for one in range(ones_begin, zeros_begin):
        j = slot[one]
        row = qo + j * n
        dj = d[co + j]
        for zero in range(zeros_begin, zeros_end):
            i = slot[zero]
            value = dj + d[co + i] - 2.0 * np.float64(Q[row + i])
            if value < limit and (value < local or (value == local and (j < local_j or (j == local_j and i < local_i)))) \
                    and _allowed(tabu_until, co, i, j, it, value, current, best):
                local = value
                local_i = i
                local_j = j
    if local < limit:
        found[0] = local
        found[1] = local_i
        found[2] = local_j


@njit(cache=True, inline="always")
def _insertion_sort(keys, slot, begin, end):
    """Sort slot[begin:end] by keys[begin:end] (ascending, stable), moving both; for short runs."""
    for position in range(begin + 1, end):
        key = keys[position]
        item = slot[position]
        back = position - 1
        while back >= begin and keys[back] > key:
            keys[back + 1] = keys[back]
            slot[back + 1] = slot[back]
            back -= 1
        keys[back + 1] = key
        slot[back + 1] = item


@njit(cache=True, inline="always")
def _scan_row(Q, row, dj, slack, co, j, slot, keys, zeros_begin, zeros_end, tabu_until, it, current, best, found):
    """Zeros of one row in ascending d_i (keys), up to the first whose bound cannot beat found."""
    target = found[0]  # a local copy: the compiler cannot tell found from keys, and would reload it
    stop = target + slack
    for zero in range(zeros_begin, zeros_end):
        di = keys[zero]
        if di >= stop:
            break
        i = slot[zero]
        value = dj + di - 2.0 * np.float64(Q[row + i])
        if value < target and _allowed(tabu_until, co, i, j, it, value, current, best):
            target = value
            stop = target + slack
            found[0] = value
            found[1] = i
            found[2] = j


@njit(cache=True)
def _scan_pruned(Q, qo, n, co, d, rowmax, colmax, vo, slot, keys, tabu_until, it, current, best, begin, count, end,
                 found):
    """The best allowed pair of a large group, skipping pairs that provably cannot beat it.

    With m_j = max Q_ji over the group's light columns i ≠ j (fixed per problem), ΔE(i, j) ≥
    d_i + d_j − 2 m_j for every light zero i. The few *heavy* columns (colmax > −BIG: entries
    several times the rest, as rows with outlier input channels have) are left out of m_j —
    they would loosen every row's bound — and bounded on their own, ΔE(i, j) ≥ d_i + min d_j −
    2 colmax_i, scanned against every one only when that bound can beat the best found.
    1. The row with the lowest d_j − 2 m_j is scanned against every light zero: a first "best".
    2. Each heavy zero is checked (and scanned when its bound allows).
    3. Rows whose bound (with the lowest light d_i) cannot beat the best are dropped; a zero can
       only matter if d_i < best + max over the remaining rows of (2 m_j − d_j). Those zeros are
       moved to the front of the group's zero slots and sorted by d_i (few: ~10 % of pairs
       survive on real blocks), and each remaining row scans them up to its own bound.
    Exact: the pair returned is the best allowed one (ties aside). The slots' order inside
    the [ones | zeros] segments is scratch; only the membership matters elsewhere.
    """
    ones_begin = co + begin
    zeros_begin = ones_begin + count
    zeros_end = co + end
    lowest_zero = BIG
    heavy_zeros = 0
    for position in range(zeros_begin, zeros_end):
        i = slot[position]
        if colmax[vo + i] > -BIG:
            keys[position] = BIG  # never a candidate of the bounded scans
            heavy_zeros += 1
            continue
        value = d[co + i]
        keys[position] = value
        if value < lowest_zero:
            lowest_zero = value
    first = -1
    lowest_key = BIG
    lowest_one = BIG
    for position in range(ones_begin, zeros_begin):
        j = slot[position]
        key = d[co + j] - 2.0 * rowmax[vo + j]
        keys[position] = key
        if key < lowest_key:
            lowest_key = key
            first = position
        if d[co + j] < lowest_one:
            lowest_one = d[co + j]
    light = lowest_key + lowest_zero < found[0]
    # 1. the most promising row against every light zero (unsorted: no early stop)
    if light:
        j = slot[first]
        dj = d[co + j]
        row = qo + j * n
        for zero in range(zeros_begin, zeros_end):
            i = slot[zero]
            value = dj + keys[zero] - 2.0 * np.float64(Q[row + i])
            if value < found[0] and _allowed(tabu_until, co, i, j, it, value, current, best):
                found[0] = value
                found[1] = i
                found[2] = j
    # 2. heavy zeros, each against every one when its own bound can still win
    if heavy_zeros:
        for zero in range(zeros_begin, zeros_end):
            i = slot[zero]
            if colmax[vo + i] <= -BIG:
                continue
            di = d[co + i]
            if di + lowest_one - 2.0 * colmax[vo + i] >= found[0]:
                continue
            for position in range(ones_begin, zeros_begin):
                j = slot[position]
                value = di + d[co + j] - 2.0 * np.float64(Q[qo + j * n + i])
                if value < found[0] and _allowed(tabu_until, co, i, j, it, value, current, best):
                    found[0] = value
                    found[1] = i
                    found[2] = j
    if not light:
        return
    # 3. the light zeros any other row could still use, sorted
    widest = -BIG
    for position in range(ones_begin, zeros_begin):
        if position != first and keys[position] + lowest_zero < found[0]:
            slack = 2.0 * rowmax[vo + slot[position]] - d[co + slot[position]]
            if slack > widest:
                widest = slack
    if widest == -BIG:
        return
    candidates_end = zeros_begin
    limit = found[0] + widest
    for zero in range(zeros_begin, zeros_end):
        if keys[zero] < limit:
            keys[zero], keys[candidates_end] = keys[candidates_end], keys[zero]
            slot[zero], slot[candidates_end] = slot[candidates_end], slot[zero]
            candidates_end += 1
    _insertion_sort(keys, slot, zeros_begin, candidates_end)
    for position in range(ones_begin, zeros_begin):
        if position == first or keys[position] + lowest_zero >= found[0]:
            continue
        j = slot[position]
        dj = d[co + j]
        _scan_row(Q, qo + j * n, dj, 2.0 * rowmax[vo + j] - dj, co, j, slot, keys, zeros_begin, candidates_end,
                  tabu_until, it, current, best, found)


@njit(cache=True)
def _move_slots(slot, co, begin, count, end, i, j):
    """Keep the group's [ones | zeros] slot layout after i came in and j went out."""
    for position in range(co + begin, co + end):
        if slot[position] == j and position < co + begin + count:
            slot[position] = i
        elif slot[position] == i and position >= co + begin + count:
            slot[position] = j


@njit(cache=True)
def _best_swap(Q, qo, n, co, d, rowmax, colmax, vo, slot, keys, tabu_until, it, current, best, g_start, g_size, g_count,
               sw_groups, sw_base, nsw, grp_base, found):
    """The best allowed swap over every swappable group: found = [ΔE, i (in), j (out)].

    When every move is tabu and none aspires, the best move regardless of tabu is taken
    (a second pass with ``it`` beyond every tenure); found[1] < 0 only when no swap exists.
    """
    for attempt in range(2):
        found[0] = BIG
        found[1] = -1
        found[2] = -1
        now = it if attempt == 0 else (1 << 62)  # second pass: nothing is tabu
        for s in range(nsw):
            group = sw_groups[sw_base + s]
            begin = g_start[grp_base + group]
            end = begin + g_size[grp_base + group]
            if end - begin <= SMALL_GROUP:
                _scan_small(Q, qo, n, co, slot, d, tabu_until, now, current, best, begin, g_count[grp_base + group], end,
                            found)
            else:
                _scan_pruned(Q, qo, n, co, d, rowmax, colmax, vo, slot, keys, tabu_until, now, current, best, begin,
                             g_count[grp_base + group], end, found)
        if found[1] >= 0:
            return


@njit(cache=True, inline="always")
def _group_views(x, h, tabu_until, diag, co, vo, first, size):
    """One group's x, h, tabu_until and diagonal in one chain, as views indexed from 0.

    Why: an index the compiler knows to be ≥ 0 spares numba's wrap-around test for negative
    indices; read as x[co + v], the drop-add kernel was 1.7× slower.
    """
    return (x[co + first : co + first + size], h[co + first : co + first + size],
            tabu_until[co + first : co + first + size], diag[vo + first : vo + first + size])


@njit(cache=True, inline="always")
def _drop_add_pass(Q, diag, vo, qo, n, co, x, h, tabu_until, now, current, best, g_start, g_size, sw_groups, sw_base,
                   nsw, grp_base, found):
    """One pass of :func:`_drop_add` with variables tabu until after ``now``; False when no move is allowed."""
    drop = BIG
    j = -1
    j_group = -1
    for s in range(nsw):
        group = grp_base + sw_groups[sw_base + s]
        first = g_start[group]
        xs, hs, tabu, diagonal = _group_views(x, h, tabu_until, diag, co, vo, first, g_size[group])
        for t in range(g_size[group]):
            if xs[t] and tabu[t] <= now:
                value = diagonal[t] - 2.0 * hs[t]
                if value < drop:
                    drop = value
                    j = first + t
                    j_group = group
    if j < 0:
        return False
    first = g_start[j_group]
    size = g_size[j_group]
    xs, hs, tabu, diagonal = _group_views(x, h, tabu_until, diag, co, vo, first, size)
    row = Q[qo + j * n + first : qo + j * n + first + size]
    add = BIG
    i = -1
    for t in range(size):
        if not xs[t]:
            value = diagonal[t] + 2.0 * hs[t] - 2.0 * np.float64(row[t])
            if value < add and (tabu[t] <= now or current + drop + value < best):
                add = value
                i = first + t
    if i < 0:
        return False
    found[0] = drop + add
    found[1] = i
    found[2] = j
    return True


@njit(cache=True)
def _drop_add(Q, diag, vo, qo, n, co, x, h, tabu_until, it, current, best, g_start, g_size, sw_groups, sw_base, nsw,
              grp_base, found):
    """A swap chosen in two halves, O(B) in all: found = [ΔE, i (in), j (out)].

    The drop is the allowed one with the lowest single-flip delta d_j = Q_jj − 2h_j over every
    swappable group; the add is the allowed zero of j's group with the lowest ΔE given that
    drop, d_i − 2Q_ij (or any zero that makes a new best state). Why: on rows with outlier input
    channels the best-swap scan keeps thousands of pairs per iteration past its bound, and the
    search needs tens of thousands of iterations to leave the valleys it stalls in; this move
    costs three passes over the group, so the same time buys ~17× the iterations (docs/solvers.md,
    "Drop-add moves"). Groups are read in index order from x (the slot layout is not kept up to
    date in this mode: only kicks use it, and they rebuild it), so ties go to the lowest index.
    As in :func:`_best_swap`, a second pass ignores tabus when nothing is allowed.
    """
    if not _drop_add_pass(Q, diag, vo, qo, n, co, x, h, tabu_until, it, current, best, g_start, g_size, sw_groups,
                          sw_base, nsw, grp_base, found):
        if not _drop_add_pass(Q, diag, vo, qo, n, co, x, h, tabu_until, 1 << 62, current, best, g_start, g_size,
                              sw_groups, sw_base, nsw, grp_base, found):
            found[1] = -1


@njit(parallel=True, cache=True)
def init_chains(Q, q_off, nvar, var_off, var_group, x0, grp_off, ngrp, g_start, g_count, chain_problem,
                chain_var_off, chain_use_x0, key_start, x, best_x, slot, h, tabu_until, energy, best_energy):
    """Start state (x0 or random feasible), fields h = Qx and energies of every chain."""
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        n = nvar[p]
        co = chain_var_off[c]
        qo = q_off[p]
        _start_state(n, var_off[p], co, chain_use_x0[c], x0, var_group, grp_off[p], ngrp[p], g_start, g_count,
                     key_start[c], x, slot)
        total = 0.0
        for v in range(n):
            field = 0.0
            row = qo + v * n
            for u in range(n):
                if x[co + u]:
                    field += np.float64(Q[row + u])
            h[co + v] = field
            tabu_until[co + v] = 0
            best_x[co + v] = x[co + v]
            if x[co + v]:
                total += field
        energy[c] = total
        best_energy[c] = total


@njit(cache=True)
def _kick(Q, qo, n, co, vo, diag, x, best_x, slot, h, d, tabu_until, g_start, g_size, g_count, grp_base, ngroups,
          sw_groups, sw_base, nsw, key, counter, swaps):
    """Back to the best state seen, then ``swaps`` random swaps inside groups; returns the new energy.

    Why: a tabu search with a short tenure ends up cycling through the same few states of a
    valley (on N:M blocks and rows with outlier channels it stalls 1–10 % above the best
    known); restarting from the best state with a few random swaps (iterated tabu search)
    explores the valleys next to it instead. Fields, deltas and the slot layout are rebuilt
    (O(B²), a few iterations' worth) and every tenure is lifted.
    """
    for v in range(n):
        x[co + v] = best_x[co + v]
    for group in range(ngroups):
        begin = g_start[grp_base + group]
        one = co + begin
        zero = one + g_count[grp_base + group]
        for v in range(begin, begin + g_size[grp_base + group]):
            if x[co + v]:
                slot[one] = v
                one += 1
            else:
                slot[zero] = v
                zero += 1
    for m in range(swaps):
        a, b = _pick(key, counter + m, nsw, sw_base, sw_groups, grp_base, g_start, g_size, g_count)
        j = slot[co + a]
        i = slot[co + b]
        slot[co + a] = i
        slot[co + b] = j
        x[co + i] = 1
        x[co + j] = 0
    total = 0.0
    for v in range(n):
        field = 0.0
        row = qo + v * n
        for u in range(n):
            if x[co + u]:
                field += np.float64(Q[row + u])
        h[co + v] = field
        d[co + v] = diag[vo + v] + (2.0 - 4.0 * x[co + v]) * field
        tabu_until[co + v] = 0
        if x[co + v]:
            total += field
    return total


@njit(parallel=True, cache=True)
def search(Q, diag, q_off, nvar, var_off, var_group, rowmax, colmax, grp_off, ngrp, g_start, g_size, g_count, sw_off, nsw, sw_groups,
           chain_problem, chain_var_off, key_run, tenure_in, tenure_out, tenure_spread, stall, kick, move, it_begin,
           it_end, x, best_x, slot, keys, h, d, tabu_until, energy, best_energy, moves, since_best):
    """Iterations it_begin..it_end−1 of every chain's tabu search (state kept in the arrays).

    stall[p] > 0: after that many iterations without a new best state the chain is kicked
    (:func:`_kick`, kick[p] random swaps from the best state); the kick takes the place
    of that iteration's move. since_best (per chain) carries the count across calls.
    move[p]: MOVE_BEST (the best allowed swap, :func:`_best_swap`) or MOVE_DROP_ADD (:func:`_drop_add`).
    """
    for c in prange(chain_problem.shape[0]):
        p = chain_problem[c]
        if nsw[p] == 0:
            continue
        n = nvar[p]
        co = chain_var_off[c]
        qo = q_off[p]
        key = key_run[c]
        current = energy[c]
        best = best_energy[c]
        vo = var_off[p]
        found = np.empty(3, np.float64)
        _refresh(diag, vo, n, co, x, h, d)
        chain_move = move[p]
        for it in range(it_begin, it_end):
            if stall[p] > 0 and since_best[c] >= stall[p]:
                current = _kick(Q, qo, n, co, vo, diag, x, best_x, slot, h, d, tabu_until, g_start, g_size, g_count,
                                grp_off[p], ngrp[p], sw_groups, sw_off[p], nsw[p],
                                key ^ _KICK_SALT, it * kick[p], kick[p])
                since_best[c] = 0
                if current < best:
                    best = current
                    for v in range(n):
                        best_x[co + v] = x[co + v]
                continue
            if chain_move == MOVE_DROP_ADD:
                _drop_add(Q, diag, vo, qo, n, co, x, h, tabu_until, it, current, best, g_start, g_size, sw_groups,
                          sw_off[p], nsw[p], grp_off[p], found)
            else:
                _best_swap(Q, qo, n, co, d, rowmax, colmax, var_off[p], slot, keys, tabu_until, it, current, best,
                           g_start, g_size, g_count, sw_groups, sw_off[p], nsw[p], grp_off[p], found)
            if found[1] < 0:
                break
            i = np.int64(found[1])
            j = np.int64(found[2])
            x[co + i] = 1
            x[co + j] = 0
            if chain_move == MOVE_BEST:
                group = grp_off[p] + var_group[var_off[p] + i]
                begin = g_start[group]
                _move_slots(slot, co, begin, g_count[group], begin + g_size[group], i, j)
            row_i = qo + i * n
            row_j = qo + j * n
            # views indexed from 0 (see _group_views)
            fields = h[co : co + n]
            into = Q[row_i : row_i + n]
            out = Q[row_j : row_j + n]
            if chain_move == MOVE_DROP_ADD:  # it reads the fields only
                for v in range(n):
                    fields[v] += np.float64(into[v]) - np.float64(out[v])
            else:
                deltas = d[co : co + n]
                diagonal = diag[vo : vo + n]
                xs = x[co : co + n]
                for v in range(n):  # fields and single-flip deltas after the move, in one pass
                    field = fields[v] + (np.float64(into[v]) - np.float64(out[v]))
                    fields[v] = field
                    deltas[v] = diagonal[v] + (2.0 - 4.0 * xs[v]) * field
            current += found[0]
            bits = _draw(key, it)
            # j may not come back for tenure_out + U[0, spread] iterations; i may not leave for tenure_in + ...
            tabu_until[co + j] = it + 1 + tenure_out[p] + _below(bits >> _U32, tenure_spread[p] + 1)
            tabu_until[co + i] = it + 1 + tenure_in[p] + _below(bits & _LOW32, tenure_spread[p] + 1)
            moves[c] += 1
            if current < best:
                best = current
                since_best[c] = 0
                for v in range(n):
                    best_x[co + v] = x[co + v]
            else:
                since_best[c] += 1
        energy[c] = current
        best_energy[c] = best


# ---------------------------------------------------------------------- packing and driving
def next_chunk(left: int, last_chunk: int, last_seconds: float, deadline: float | None) -> int:
    """Iterations to run before looking at the clock again (all of them without a limit).

    Paced on the *last* chunk and at most doubling: an iteration gets several times slower
    as the search reaches good states (the pruning bound then skips fewer pairs), so an
    average over the whole run would overshoot the deadline.
    """
    if deadline is None:
        return left
    if last_chunk == 0:
        return min(left, 4)
    seconds_per_iteration = max(last_seconds / last_chunk, 1e-9)
    target = max((deadline - time.perf_counter()) / 4.0, 0.002)
    return max(1, min(left, 2 * last_chunk, int(target / seconds_per_iteration)))


@dataclass
class TabuResults:
    """What the kernel hands back for one problem: one row per restart, original variable order."""

    best_x: np.ndarray  # (restarts, B) uint8
    kernel_energy: np.ndarray  # (restarts,) float64, without the offset
    moves: np.ndarray  # (restarts,) int64, swaps made
    iterations_done: int


@dataclass
class KernelProblem:
    """A problem in the kernel's numbering: dense float32 Q with every group a contiguous range."""

    Q: np.ndarray  # (B, B) float32, rows and columns permuted
    order: np.ndarray  # kernel index -> original variable
    group_of: np.ndarray  # sorted group labels, in kernel numbering
    counts: np.ndarray
    x0: np.ndarray | None  # in kernel numbering
    tenure: tuple[int, int, int]  # (in, out, spread)
    rowmax: np.ndarray  # (B,) float64: max Q_ji over j's group's light columns i ≠ j (groups > SMALL_GROUP only)
    colmax: np.ndarray  # (B,) float64: max_{j≠i} Q_ji over i's group for heavy columns i, −BIG for the rest
    kick: tuple[int, int] = (0, 0)  # (stall, swaps): kick after stall iterations without a new best; 0: never
    move: int = MOVE_BEST  # MOVE_BEST or MOVE_DROP_ADD

    @property
    def num_variables(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.counts.shape[0])


def heavy_columns(block: np.ndarray) -> np.ndarray:
    """Columns of a large group (diagonal set to −inf) whose largest entry is HEAVY_FACTOR × the median
    column's, at most size // HEAVY_SHARE of them (the largest): their own bound in :func:`_scan_pruned`."""
    largest = block.max(axis=0)
    limit = HEAVY_FACTOR * float(np.median(largest))
    ranked = np.argsort(-largest, kind="stable")[: block.shape[0] // HEAVY_SHARE]
    return np.sort(ranked[largest[ranked] > limit]) if limit > 0 else ranked[:0]


def kernel_problem(Q: np.ndarray, group_of: np.ndarray, counts: np.ndarray, x0: np.ndarray | None,
                   tenure: tuple[int, int, int], kick: tuple[int, int] = (0, 0),
                   move: int = MOVE_BEST) -> KernelProblem:
    """Renumber a dense problem so that each group is contiguous (a no-op copy for one group)."""
    order = np.argsort(group_of, kind="stable").astype(np.int64)
    if not np.array_equal(order, np.arange(order.shape[0])):
        Q = Q[np.ix_(order, order)]
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    sizes = np.bincount(group_of, minlength=len(counts))
    rowmax = np.zeros(order.shape[0], np.float64)
    colmax = np.full(order.shape[0], -BIG)
    for begin, size in zip(np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes):
        if size > SMALL_GROUP:
            block = Q[begin : begin + size, begin : begin + size].astype(np.float64)
            np.fill_diagonal(block, -np.inf)
            heavy = heavy_columns(block)
            colmax[begin + heavy] = block[:, heavy].max(axis=0)
            block[:, heavy] = -np.inf
            rowmax[begin : begin + size] = block.max(axis=1)
    return KernelProblem(Q=Q, order=order, group_of=np.ascontiguousarray(group_of[order], dtype=np.int64),
                         counts=np.asarray(counts, np.int64),
                         x0=None if x0 is None else np.ascontiguousarray(x0[order], dtype=np.uint8), tenure=tenure,
                         rowmax=rowmax, colmax=colmax, kick=(int(kick[0]), int(kick[1])), move=int(move))


def _run_part(problems: list[KernelProblem], keys: np.ndarray, use_x0: np.ndarray, iterations: int,
              deadline: float | None) -> list[TabuResults]:
    restarts = keys.shape[1]
    L = _constraint_layout(problems, use_x0)
    count = len(problems)
    chain_problem = np.repeat(np.arange(count, dtype=np.int64), restarts)
    chain_sizes = L["nvar"][chain_problem]
    chain_var_off = np.concatenate(([0], np.cumsum(chain_sizes)[:-1])).astype(np.int64)
    chain_use_x0 = np.repeat(use_x0.astype(np.bool_), restarts)
    key_start = np.ascontiguousarray(keys[:, :, 0].reshape(-1))
    key_run = np.ascontiguousarray(keys[:, :, 2].reshape(-1))
    total = int(chain_sizes.sum())
    chains = chain_problem.shape[0]
    x, best_x = np.zeros(total, np.uint8), np.zeros(total, np.uint8)
    slot = np.zeros(total, np.int64)
    keys = np.zeros(total, np.float64)
    h, d = np.zeros(total, np.float64), np.zeros(total, np.float64)
    tabu_until = np.zeros(total, np.int64)
    energy, best_energy = np.zeros(chains, np.float64), np.zeros(chains, np.float64)
    moves = np.zeros(chains, np.int64)
    q_off = np.concatenate(([0], np.cumsum(L["nvar"] * L["nvar"])[:-1])).astype(np.int64)
    Q = np.concatenate([p.Q.reshape(-1) for p in problems])
    rowmax = np.concatenate([p.rowmax for p in problems])
    colmax = np.concatenate([p.colmax for p in problems])
    diag = np.concatenate([np.diagonal(p.Q).astype(np.float64) for p in problems])
    tenure = np.array([p.tenure for p in problems], np.int64).reshape(count, 3)
    tenure_in, tenure_out, spread = (np.ascontiguousarray(tenure[:, column]) for column in range(3))
    stall = np.array([p.kick[0] for p in problems], np.int64)
    kick = np.array([p.kick[1] for p in problems], np.int64)
    move = np.array([p.move for p in problems], np.int64)
    since_best = np.zeros(chains, np.int64)
    init_chains(Q, q_off, L["nvar"], L["var_off"], L["var_group"], L["x0"], L["grp_off"], L["ngrp"], L["g_start"],
                L["g_count"], chain_problem, chain_var_off, chain_use_x0, key_start, x, best_x, slot, h,
                tabu_until, energy, best_energy)
    done = 0
    chunk = 0
    chunk_seconds = 0.0
    while done < iterations:
        if deadline is not None and done > 0 and time.perf_counter() >= deadline:
            break
        chunk = next_chunk(iterations - done, chunk, chunk_seconds, deadline)
        chunk_started = time.perf_counter()
        search(Q, diag, q_off, L["nvar"], L["var_off"], L["var_group"], rowmax, colmax, L["grp_off"], L["ngrp"], L["g_start"],
               L["g_size"], L["g_count"], L["sw_off"], L["nsw"], L["sw_groups"], chain_problem, chain_var_off, key_run,
               tenure_in, tenure_out, spread, stall, kick, move, done, done + chunk, x, best_x, slot, keys, h, d,
               tabu_until, energy, best_energy, moves, since_best)
        chunk_seconds = time.perf_counter() - chunk_started
        done += chunk
    results = []
    for index, problem in enumerate(problems):
        start = int(chain_var_off[index * restarts])
        size = problem.num_variables
        permuted = best_x[start : start + restarts * size].reshape(restarts, size)
        original = np.empty_like(permuted)
        original[:, problem.order] = permuted
        rows = slice(index * restarts, (index + 1) * restarts)
        results.append(TabuResults(best_x=original, kernel_energy=best_energy[rows].copy(),
                                   moves=moves[rows].copy(), iterations_done=done))
    return results


def run_batch(problems: list[KernelProblem], keys: np.ndarray, use_x0: np.ndarray, iterations: int,
              time_limit: float | None) -> list[TabuResults]:
    """Search every problem of a batch; one TabuResults per problem, in order.

    keys: (P, restarts, 3) uint64 chain keys. A batch whose matrices exceed MAX_BYTES_PER_CALL
    runs in parts; a time limit is shared among the parts in proportion to their O(B²) work.
    """
    parts: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, problem in enumerate(problems):
        size = 4 * problem.num_variables**2
        if current and current_bytes + size > MAX_BYTES_PER_CALL:
            parts.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        parts.append(current)
    work = [sum(problems[i].num_variables ** 2 for i in part) for part in parts]
    results: list[TabuResults | None] = [None] * len(problems)
    started = time.perf_counter()
    for position, part in enumerate(parts):
        share = time_share(time_limit, started, work, position)
        deadline = None if share is None else time.perf_counter() + share
        answers = _run_part([problems[i] for i in part], keys[part], use_x0[part], iterations, deadline)
        for index, answer in zip(part, answers):
            results[index] = answer
    return results  # type: ignore[return-value]
