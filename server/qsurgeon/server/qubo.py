"""QUBO builders: turn (weights, statistics, current mask, a block of weights) into BlockProblems.

Two objectives (METHOD.md §4, §5), both quadratic in the block's mask bits ``x_S``
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
from torch import Tensor

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.problem import BlockProblem

#: float64 elements of a (blocks, B, B) work array built at once; bounds builder memory.
_CHUNK_ELEMENTS = 1 << 22


def symmetric_gram(gram: Tensor) -> Tensor:
    """H as float64 and exactly symmetric ((H + Hᵀ)/2 is bitwise symmetric), so block Qs are too."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise UsageError(f"gram must be a square (in, in) matrix, got {tuple(gram.shape)}")
    gram = gram.detach().to(torch.float64)
    return (gram + gram.T) * 0.5


def row_errors(weight0: Tensor, gram: Tensor, mask: Tensor) -> Tensor:
    """Exact layer-wise error of every row, e_r = (w0_r∘x_r)ᵀ H (w0_r∘x_r), float64 (out,)."""
    pruned = weight0.detach().to(torch.float64) * mask.to(torch.float64)
    return ((pruned @ gram.to(torch.float64)) * pruned).sum(dim=1)


def _as_index(name: str, value: Tensor | np.ndarray | Sequence, ndim: int | tuple[int, ...]) -> Tensor:
    index = torch.as_tensor(value)
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise UsageError(f"{name} must be integer indices")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if index.ndim not in allowed:
        raise UsageError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got {tuple(index.shape)}")
    return index.to(torch.int64)


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
    """Layer-wise QUBOs (METHOD.md §5) for many blocks at once, with batched gathers.

    ``cols`` (n, B) are the input indices of each block's weights; ``rows`` is (n,) when
    each block lies in one row (the usual case) or (n, B) for blocks spread over several
    rows (e.g. along a column): weights in different rows never couple. ``groups``
    (B,) or (n, B) integer labels split a block into N:M groups, each keeping its current
    pruned count; without it the block keeps its total pruned count.

    For one row with fixed pruned set F outside the block S:
    Q = diag(w0_S) H[S,S] diag(w0_S) + diag(2 w0_S ∘ (H[S,F] w0_F)) and the offset is
    w0_Fᵀ H[F,F] w0_F, so the energy is the error of the touched rows. The linear term
    comes from the row's field v = H(w0∘x) minus the block's own part, so one matrix
    product per row serves every block of a round.
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
    if ids is not None and len(ids) != n_blocks:
        raise UsageError(f"{len(ids)} ids for {n_blocks} blocks")
    if groups is not None:
        groups = _as_index("groups", groups, (1, 2))
        groups = groups.expand(n_blocks, block) if groups.ndim == 1 else groups
    if n_blocks == 0:
        return []
    gram = gram.to(torch.float64) if gram_is_symmetric else symmetric_gram(gram)
    weight = weight0.detach().to(torch.float64)
    multi_row = rows.ndim == 2
    row_ids = rows.unique() if multi_row else rows
    pruned_rows = weight[row_ids] * mask[row_ids].to(torch.float64)
    field = pruned_rows @ gram  # v_r = H (w0_r ∘ x_r) for every touched row
    row_error = (field * pruned_rows).sum(dim=1)
    if multi_row:
        where = torch.searchsorted(row_ids, rows)  # (n, B) position of each entry's row in row_ids
    problems: list[BlockProblem] = []
    chunk = max(1, _CHUNK_ELEMENTS // (block * block))
    for start in range(0, n_blocks, chunk):
        stop = min(n_blocks, start + chunk)
        c = cols[start:stop]
        if multi_row:
            r = rows[start:stop]
            w_s = weight[r, c]
            x_s = mask[r, c].to(torch.float64)
            v_s = field[where[start:stop], c]
            same_row = r[:, :, None] == r[:, None, :]
            # error of the touched rows, each counted once: weight each entry by 1/multiplicity
            multiplicity = same_row.sum(dim=2).to(torch.float64)
            touched_error = (row_error[where[start:stop]] / multiplicity).sum(dim=1)
        else:
            r = rows[start:stop]
            w_s = weight[r[:, None], c]
            x_s = mask[r[:, None], c].to(torch.float64)
            v_s = torch.gather(field[start:stop], 1, c)
            touched_error = row_error[start:stop]
        quadratic = (w_s[:, :, None] * w_s[:, None, :]) * gram[c[:, :, None], c[:, None, :]]
        if multi_row:
            quadratic = quadratic * same_row
        inner = torch.bmm(quadratic, x_s[:, :, None]).squeeze(2)  # the block's own share of w0∘v
        linear = 2.0 * (w_s * v_s - inner)
        quadratic.diagonal(dim1=1, dim2=2).add_(linear)
        q32 = quadratic.to(torch.float32)
        x_np = x_s.to(torch.uint8).numpy()
        current = torch.bmm(q32.to(torch.float64), x_s[:, :, None]).squeeze(2).mul_(x_s).sum(dim=1)
        offsets = (touched_error - current).tolist()
        q_np = q32.numpy()
        if groups is None:
            ks = x_np.sum(axis=1).tolist()
        else:
            g = groups[start:stop].numpy()
            n_groups = int(g.max()) + 1
            counts = np.zeros((stop - start, n_groups), np.int64)
            np.add.at(counts, (np.arange(stop - start)[:, None], g), x_np)
        for local in range(stop - start):
            index = start + local
            common = dict(
                offset=offsets[local], x0=x_np[local], id=ids[index] if ids is not None else str(index),
                validate=False,
            )
            if groups is None:
                problems.append(BlockProblem.dense(q_np[local], k=ks[local], **common))
            else:
                problems.append(BlockProblem.dense(q_np[local], groups=g[local], counts=counts[local], **common))
    return problems


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
    """Fisher QUBO (METHOD.md §4) in factored form Q = FᵀF + diag(c); never forms B×B.

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
