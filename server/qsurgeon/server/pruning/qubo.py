"""QUBO builders: turn (weights, statistics, current mask, a block of weights) into BlockProblems.

Two objectives (docs/icbs.md §4, §5), both quadratic in the block's mask bits ``x_S``
(1 = pruned), so every block is a cardinality-constrained QUBO. Each builder puts the
block's *current* assignment in ``x0`` and derives the constraint from it (the number
pruned in the block, or in each N:M group of it, stays what it is now), so a block
never changes the density.

What the energy means (``energy(x) = xᵀQx + offset``):

- layer-wise: the VALUE of the reconstruction error ‖(w0 − ŵ)ᵀA‖² summed over the rows
  the block touches, with everything outside the block at its current mask. Exact, no
  Taylor step: ``energy(x0)`` is those rows' current error.
- fisher: the modelled CHANGE of the loss from the current weights,
  gᵀδ + ½δᵀHδ (first-order term scaled by γ) plus the ridge λ‖δ‖², with H = GᵀG/N the
  empirical Fisher. ``energy(x0)`` is 0 when the current weights are the masked originals.

Matrices are built in float64 and stored as float32 that is exactly symmetric by
construction (products of commuting factors), so ``BlockProblem.dense(validate=False)``
is safe; offsets are fixed against the stored float32 Q so ``energy(x0)`` is exact.
Nothing is rescaled: the annealer's β is dimensionless already.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem

def symmetric_gram(gram: Tensor) -> Tensor:
    """H as float64 and exactly symmetric ((H + Hᵀ)/2 is bitwise symmetric), so block Qs are too."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise UsageError(f"gram must be a square (in, in) matrix, got {tuple(gram.shape)}")
    gram = gram.detach().to(torch.float64)
    return (gram + gram.T) * 0.5


def row_errors(weight0: Tensor, gram: Tensor, mask: Tensor, linear: Tensor | None = None,
               constant: Tensor | None = None) -> Tensor:
    """Exact layer-wise error of every row, e_r = (w0_r∘x_r)ᵀ H (w0_r∘x_r), float64 (out,).

    ``linear`` (out, in) and ``constant`` (out,), when given, add ``Σ_j x_rj·linear_rj + constant_r``:
    the form of a row whose target is not its own weights (``--search-on refit``, engine/methods.py).
    """
    pruned = weight0.detach().to(torch.float64) * mask.to(torch.float64)
    errors = ((pruned @ gram.to(torch.float64)) * pruned).sum(dim=1)
    if linear is not None:
        errors = errors + (linear.to(torch.float64) * mask.to(torch.float64)).sum(dim=1)
    if constant is not None:
        errors = errors + constant.to(torch.float64)
    return errors


def _as_index(name: str, value: Tensor | np.ndarray | Sequence, ndim: int | tuple[int, ...]) -> Tensor:
    index = torch.as_tensor(value)
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise UsageError(f"{name} must be integer indices")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if index.ndim not in allowed:
        raise UsageError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got {tuple(index.shape)}")
    return index.to(torch.int64)


@njit(parallel=True, cache=True)
def _layerwise_kernel(gram, w_s, c, r, multi_row, x_s, v_s, touched_error, Q, offsets):  # pragma: no cover
    """Fill Q (n,B,B) float32 and offsets (n,) for every block; one block per parallel iteration.

    q_ab = (w_a·w_b)·H[c_a,c_b] for entries of the same row: exactly symmetric, because
    w_a·w_b commutes and H is symmetric, so each row of Q is written in order without
    mirroring. The diagonal adds the linear term 2·(w_a·v_a − Σ_b q_ab x_b), the coupling
    to the row's fixed pruned weights. The offset makes energy(x0), evaluated from the
    stored float32 Q, equal the touched rows' error.
    """
    n, block = c.shape
    for i in prange(n):
        current = 0.0
        for a in range(block):
            ca = c[i, a]
            wa = w_s[i, a]
            inner = 0.0
            for b in range(block):
                if multi_row and r[i, a] != r[i, b]:
                    q = 0.0
                else:
                    q = (wa * w_s[i, b]) * gram[ca, c[i, b]]
                inner += q * x_s[i, b]
                Q[i, a, b] = np.float32(q)
            q_aa = (wa * wa) * gram[ca, ca]
            Q[i, a, a] = np.float32(q_aa + 2.0 * (wa * v_s[i, a] - inner))
        for a in range(block):
            if x_s[i, a] != 0.0:
                for b in range(block):
                    if x_s[i, b] != 0.0:
                        current += np.float64(Q[i, a, b])
        offsets[i] = touched_error[i] - current


@njit(parallel=True, cache=True)
def _entry_fields(gram, pruned_rows, where, c, out):  # pragma: no cover - compiled
    """out[i,a] = H[c_ia,:] · (w0∘x) of the entry's row: the field at block entries only."""
    n, block = c.shape
    width = gram.shape[0]
    for i in prange(n):
        for a in range(block):
            row = where[i, a]
            column = c[i, a]
            total = 0.0
            for j in range(width):
                total += gram[column, j] * pruned_rows[row, j]
            out[i, a] = total


def layerwise_arrays(
    weight0: Tensor,
    gram: Tensor,
    mask: Tensor,
    rows: Tensor,
    cols: Tensor,
    *,
    gram_is_symmetric: bool = False,
    row_error: Tensor | None = None,
    out: np.ndarray | None = None,
    linear: Tensor | None = None,
    constant: Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stacked form of :func:`layerwise_blocks`: Q (n,B,B) float32, x0 (n,B) uint8, offsets (n,).

    ``out``: a C-contiguous float32 (n,B,B) array to write Q into (iCBS hands every tensor
    of a round a slice of one buffer, so the solver can read all blocks of the round in
    place); by default Q is a new array.

    For engines that judge thousands of blocks at once without a Python loop per block.
    ``row_error`` (out,), the current error of every row when the caller tracks it, spares
    the full field H(w0∘x) of each touched row: the field is then computed only at the
    block's entries, which is what makes blocks along a column (B rows, one column each)
    and blocks in wide rows cheap.

    ``linear`` (out, in) / ``constant`` (out,): a per-entry linear term and a per-row constant
    of the energy (:func:`row_errors`); the linear term goes onto Q's diagonal, and
    ``row_error``, when given, must already include both.
    """
    cols = _as_index("cols", cols, 2)
    rows = _as_index("rows", rows, (1, 2))
    n_blocks, block = cols.shape
    if rows.shape[0] != n_blocks or (rows.ndim == 2 and rows.shape != cols.shape):
        raise UsageError(f"rows {tuple(rows.shape)} do not match cols {tuple(cols.shape)}")
    if weight0.shape != mask.shape or gram.shape != (weight0.shape[1], weight0.shape[1]):
        raise UsageError(
            f"shapes disagree: weight {tuple(weight0.shape)}, mask {tuple(mask.shape)}, gram {tuple(gram.shape)}"
        )
    width = weight0.shape[1]
    if n_blocks and (int(cols.min()) < 0 or int(cols.max()) >= width):
        raise UsageError(f"cols must lie in 0..{width - 1}")
    if row_error is not None and row_error.shape != (weight0.shape[0],):
        raise UsageError(f"row_error must have one entry per row ({weight0.shape[0]}), got {tuple(row_error.shape)}")
    gram = gram.to(torch.float64) if gram_is_symmetric else symmetric_gram(gram)
    weight = weight0.detach().to(torch.float64)
    multi_row = rows.ndim == 2
    row_ids = rows.unique() if multi_row else rows
    pruned_rows = weight[row_ids] * mask[row_ids].to(torch.float64)
    if multi_row:
        where = torch.searchsorted(row_ids, rows)  # (n, B) position of each entry's row in row_ids
        entry_rows = rows
    else:
        where = torch.arange(n_blocks)[:, None].expand(n_blocks, block)
        entry_rows = rows[:, None].expand(n_blocks, block)
    if row_error is not None and 4 * n_blocks * block < len(row_ids) * width:
        errors = row_error[row_ids].to(torch.float64)
        v_s = np.empty((n_blocks, block), np.float64)
        if n_blocks:
            _entry_fields(gram.numpy(), pruned_rows.numpy(), where.contiguous().numpy(), cols.contiguous().numpy(),
                          v_s)
        v_s = torch.from_numpy(v_s)
    else:
        field = pruned_rows @ gram  # v_r = H (w0_r ∘ x_r) for every touched row
        if row_error is None:
            errors = row_errors(weight[row_ids], gram, mask[row_ids], None if linear is None else linear[row_ids],
                                None if constant is None else constant[row_ids])
        else:
            errors = row_error[row_ids].to(torch.float64)
        v_s = field[where, cols]
    if multi_row:
        same_row = entry_rows[:, :, None] == entry_rows[:, None, :]
        # error of the touched rows, each counted once: weight each entry by 1/multiplicity
        touched_error = (errors[where] / same_row.sum(dim=2).to(torch.float64)).sum(dim=1)
    else:
        touched_error = errors
    w_s = weight[entry_rows, cols]
    x_s = mask[entry_rows, cols]
    if out is None:
        Q = np.empty((n_blocks, block, block), np.float32)
    elif out.shape != (n_blocks, block, block) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise UsageError(f"out must be a C-contiguous float32 array of shape {(n_blocks, block, block)}")
    else:
        Q = out
    offsets = np.empty(n_blocks, np.float64)
    if n_blocks:
        _layerwise_kernel(gram.numpy(), w_s.contiguous().numpy(), cols.contiguous().numpy(),
                          entry_rows.contiguous().numpy(), multi_row, x_s.to(torch.float64).numpy(),
                          v_s.contiguous().numpy(), touched_error.contiguous().numpy(), Q, offsets)
    if linear is not None and n_blocks:
        diagonal = np.einsum("nii->ni", Q)  # a writable view of every block's diagonal
        before = diagonal.astype(np.float64)
        diagonal += linear.to(torch.float64)[entry_rows, cols].numpy().astype(np.float32)
        # energy(x0) from the stored float32 Q stays the touched rows' error
        offsets -= ((diagonal.astype(np.float64) - before) * x_s.to(torch.float64).numpy()).sum(axis=1)
    return Q, x_s.to(torch.uint8).numpy(), offsets


@njit(parallel=True, cache=True)
def _quadratic_forms(Q, X, out):  # pragma: no cover - compiled
    n, block = X.shape
    for i in prange(n):
        total = 0.0
        for a in range(block):
            if X[i, a] != 0:
                for b in range(block):
                    if X[i, b] != 0:
                        total += np.float64(Q[i, a, b])
        out[i] = total


def block_energies(Q: np.ndarray, X: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """xᵀQx + offset in float64 for stacked blocks (n,B,B) and 0/1 assignments (n,B).

    The same value as each problem's ``energy`` (float64 sums of the float32 entries),
    without a Python call per block.
    """
    out = np.empty(X.shape[0], np.float64)
    if X.shape[0]:
        _quadratic_forms(Q, np.ascontiguousarray(X, dtype=np.uint8), out)
    return out + offsets


def problems_from_arrays(
    Q: np.ndarray, x0: np.ndarray, offsets: np.ndarray, ids: Sequence[str] | None = None,
    groups: Tensor | np.ndarray | None = None,
) -> list[BlockProblem]:
    """Wrap stacked block arrays into BlockProblems; the constraint keeps x0's counts."""
    n_blocks, block = x0.shape
    if ids is not None and len(ids) != n_blocks:
        raise UsageError(f"{len(ids)} ids for {n_blocks} blocks")
    problems: list[BlockProblem] = []
    if groups is None:
        ks = x0.sum(axis=1, dtype=np.int64).tolist()
    else:
        labels = np.asarray(groups, dtype=np.int64)
        labels = np.broadcast_to(labels, (n_blocks, block)) if labels.ndim == 1 else labels
        n_groups = int(labels.max()) + 1
        counts = np.zeros((n_blocks, n_groups), np.int64)
        np.add.at(counts, (np.arange(n_blocks)[:, None], labels), x0)
    offsets_list = offsets.tolist()
    for index in range(n_blocks):
        common = dict(offset=offsets_list[index], x0=x0[index], id=ids[index] if ids is not None else str(index),
                      validate=False)
        if groups is None:
            problems.append(BlockProblem.dense(Q[index], k=ks[index], **common))
        else:
            problems.append(BlockProblem.dense(Q[index], groups=labels[index], counts=counts[index], **common))
    return problems


def layerwise_blocks(
    weight0: Tensor,
    gram: Tensor,
    mask: Tensor,
    rows: Tensor,
    cols: Tensor,
    *,
    groups: Tensor | None = None,
    ids: Sequence[str] | None = None,
    gram_is_symmetric: bool = False,
) -> list[BlockProblem]:
    """Layer-wise QUBOs (docs/icbs.md §5) for many blocks at once.

    ``cols`` (n, B) are the input indices of each block's weights; ``rows`` is (n,) when
    each block lies in one row (the usual case) or (n, B) for blocks spread over several
    rows (e.g. along a column): weights in different rows never couple. ``groups``
    (B,) or (n, B) integer labels split a block into N:M groups, each keeping its current
    pruned count; without it the block keeps its total pruned count.

    For one row with fixed pruned set F outside the block S:
    Q = diag(w0_S) H[S,S] diag(w0_S) + diag(2 w0_S ∘ (H[S,F] w0_F)) and the offset is
    w0_Fᵀ H[F,F] w0_F, so the energy is the error of the touched rows. The linear term
    comes from the row's field v = H(w0∘x) minus the block's own part, so one matrix
    product per row serves every block of a round; the B×B matrices are filled by one
    compiled parallel loop (no (n,B,B) float64 temporaries).
    """
    Q, x0, offsets = layerwise_arrays(weight0, gram, mask, rows, cols, gram_is_symmetric=gram_is_symmetric)
    if groups is not None:
        groups = _as_index("groups", groups, (1, 2)).numpy()
    return problems_from_arrays(Q, x0, offsets, ids, groups)


def fisher_block(
    w0: Tensor,
    d: Tensor,
    G: Tensor,
    g: Tensor,
    gamma: float,
    ridge: float,
    *,
    x0: Tensor,
    groups: Tensor | None = None,
    id: str = "",
) -> BlockProblem:
    """Fisher QUBO (docs/icbs.md §4) in factored form Q = FᵀF + diag(c); never forms B×B.

    ``w0`` (B,) original weights, ``d`` (B,) current minus original weights, ``G`` (N, B)
    per-sample gradients restricted to the block (H ≈ GᵀG/N), ``g`` (B,) the gradient at
    the current weights. F = G·diag(w0)/√(2N) carries ½·diag(w0)Hdiag(w0);
    c = w0∘(Hd) − γ·w0∘g + λ·w0∘(2d + w0); offset = ½dᵀHd − γgᵀd + λ‖d‖². The energy is
    the modelled loss change γgᵀδ + ½δᵀHδ + λ‖δ‖² for δ = −(d + w0∘x). Every entry is kept.
    """
    w0 = w0.detach().to(torch.float64).reshape(-1)
    d = d.detach().to(torch.float64).reshape(-1)
    g = g.detach().to(torch.float64).reshape(-1)
    G = G.detach().to(torch.float64)
    block = w0.shape[0]
    if G.ndim != 2 or G.shape[1] != block or d.shape[0] != block or g.shape[0] != block:
        raise UsageError(f"fisher_block: w0, d, g need {block} entries and G (N, {block}); got G {tuple(G.shape)}")
    samples = G.shape[0]
    if samples == 0:
        raise UsageError("fisher_block needs at least one per-sample gradient")
    projected_d = G @ d
    hessian_d = G.T @ projected_d / samples
    F = G * w0[None, :] / math.sqrt(2.0 * samples)
    c = w0 * hessian_d - gamma * w0 * g + ridge * w0 * (2.0 * d + w0)
    offset = 0.5 * float(projected_d @ projected_d) / samples - gamma * float(g @ d) + ridge * float(d @ d)
    x0_np = torch.as_tensor(x0).to(torch.uint8).numpy()
    constraint = _constraint_from_x0(x0_np, groups)
    problem = BlockProblem.factored(F.to(torch.float32).numpy(), c.to(torch.float32).numpy(), x0=x0_np, id=id,
                                    offset=offset, **constraint)
    # pin energy(x0) to the float64 model value despite float32 storage
    exact_current = _fisher_value(F, c, offset, x0_np)
    return BlockProblem.factored(problem.F, problem.c, x0=x0_np, id=id,
                                 offset=offset + exact_current - problem.energy(x0_np), **constraint)


def _fisher_value(F: Tensor, c: Tensor, offset: float, x: np.ndarray) -> float:
    xt = torch.as_tensor(x, dtype=torch.float64)
    projected = F @ xt
    return float(projected @ projected + c @ xt) + offset


def _constraint_from_x0(x0: np.ndarray, groups: Tensor | None) -> dict:
    if groups is None:
        return {"k": int(x0.sum())}
    labels = torch.as_tensor(groups).to(torch.int64).numpy()
    return {"groups": labels, "counts": np.bincount(labels, weights=x0, minlength=int(labels.max()) + 1).astype(np.int64)}


def weighted_sum(first: BlockProblem, second: BlockProblem, weight: float = 1.0, *, id: str | None = None) -> BlockProblem:
    """A dense problem for ``first + weight·second`` (e.g. layer-wise + fisher on one block).

    A factored Fisher part and a dense layer-wise part cannot share one factored form, so
    the sum is dense: fine for modest B (the B×B matrix is formed here once). Both
    problems must have the same variables, constraint and current assignment.
    """
    if first.num_variables != second.num_variables or not np.array_equal(first.group_of, second.group_of) \
            or not np.array_equal(first.counts, second.counts):
        raise UsageError("weighted_sum: the two problems must have the same variables and constraint")
    total = first.dense_Q() + weight * second.dense_Q()
    total = (total + total.T) * 0.5
    q32 = total.astype(np.float32)
    x0 = first.x0 if first.x0 is not None else second.x0
    offset = first.offset + weight * second.offset
    constraint = {"k": first.k} if first.num_groups == 1 else {"groups": first.group_of, "counts": first.counts}
    problem = BlockProblem.dense(q32, offset=offset, x0=x0, id=first.id if id is None else id, validate=False,
                                 **constraint)
    if x0 is not None:  # pin energy(x0) to the sum of the parts' values
        exact = first.energy(x0) + weight * second.energy(x0)
        problem = BlockProblem.dense(q32, offset=offset + exact - problem.energy(x0), x0=x0, id=problem.id,
                                     validate=False, **constraint)
    return problem
