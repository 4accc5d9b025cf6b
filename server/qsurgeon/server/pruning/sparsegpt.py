"""SparseGPT (Frantar & Alistarh, 2023), written from the paper's description.

SparseGPT prunes one linear layer at a time and repairs the damage as it goes. With
the input Gram ``H = A Aᵀ`` (damped), it walks the input columns left to right; after
column ``j`` is decided, the not-yet-visited weights of every row absorb the error by
the Optimal Brain Surgeon update

    w[j:] -= (w_j / [H_F⁻¹]_00) · [H_F⁻¹]_{:,0}        F = {j, j+1, …}

(zero for a kept weight). The inverse Hessians of the shrinking sets ``F`` are all
rows of the upper Cholesky factor ``U`` of ``H⁻¹`` (``UᵀU = H⁻¹``): row ``j`` of ``U``
divided by ``U_jj`` is ``[H_F⁻¹]_{0,:} / [H_F⁻¹]_00``, and ``U_jj² = [H_F⁻¹]_00``. So
one Cholesky factorisation replaces n explicit inverses.

Mask selection is adaptive: at the start of every block of ``blocksize`` columns, the
weights of the block are scored by the OBS saliency ``w² / U_jj²`` using the weights as
already updated, and the lowest are pruned (N:M: decided per group of M columns when the
group is reached). Updates inside a block are applied eagerly to the block only; the
rest of the row receives them in one matrix product per block ("lazy batch updates"),
which is what makes the method fast.

How many weights each block prunes follows the density constraint of ``Sparsity``:
``row`` spreads each row's exact count over the blocks by cumulative rounding, ``tensor``
does the same for the whole block (rows compete, as in the paper), ``column`` prunes a
fixed count of every column, and N:M prunes M−N of every group. The final density is
therefore exact, like every other method of qsurgeon.
"""

from __future__ import annotations

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.refit import damped_gram, inverse_from_cholesky
from qsurgeon.server.pruning.sparsity import Sparsity


#: columns per eagerly updated sub-block inside a block of ``blocksize`` columns
_SUB_BLOCK = 16


def _cumulative_share(total: int, start: int, stop: int, width: int) -> int:
    """Pruned count for columns [start, stop) when ``total`` is spread evenly over ``width``."""
    return int(round(total * stop / width)) - int(round(total * start / width))


def _lowest(scores: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest scores along ``dim`` (ties broken by index)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        index = torch.topk(scores, count, dim=dim, largest=False).indices
        chosen.scatter_(dim, index, True)
    return chosen


def _block_mask(scores: torch.Tensor, sparsity: Sparsity, start: int, width: int, rows: int) -> torch.Tensor:
    """Which weights of one column block to prune (unstructured sparsity)."""
    stop = start + scores.shape[1]
    if sparsity.granularity == "row":
        count = _cumulative_share(sparsity.pruned_per_group(width), start, stop, width)
        return _lowest(scores, count, dim=1)
    if sparsity.granularity == "column":
        return _lowest(scores, sparsity.pruned_per_group(rows), dim=0)
    count = _cumulative_share(sparsity.pruned_per_group(rows * width), start, stop, width)
    return _lowest(scores.reshape(-1), count, dim=0).reshape(scores.shape)


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: Sparsity,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × in) with SparseGPT; return ``(new_weight, mask)``.

    ``gram`` is ``A Aᵀ`` of the layer's calibration inputs (in × in), ``damp`` the
    dampening as a fraction of the mean diagonal. ``mask`` is True where pruned;
    ``new_weight`` has the kept weights updated and the pruned ones exactly zero, in
    ``weight``'s dtype. Blocks are rounded up to a multiple of M for N:M patterns.
    """
    if weight.ndim != 2:
        raise UsageError(f"SparseGPT needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    rows, width = weight.shape
    if tuple(gram.shape) != (width, width):
        raise UsageError(f"Gram matrix must be {width}×{width} for weight {tuple(weight.shape)}, got {tuple(gram.shape)}")
    if not isinstance(sparsity, Sparsity):
        raise UsageError(f"sparsity must be a Sparsity, got {type(sparsity).__name__}")
    if blocksize < 1:
        raise UsageError(f"blocksize must be positive, got {blocksize}")
    if not damp > 0:
        raise UsageError(f"SparseGPT needs a positive damping, got {damp}")
    sparsity.check_shape((rows, width))
    group = sparsity.pattern[1] if sparsity.pattern else 1
    blocksize = -(-blocksize // group) * group
    sub = -(-_SUB_BLOCK // group) * group  # whole N:M groups, so a group's columns are current when chosen

    hessian = damped_gram(gram.to(weight.device), damp)
    upper = _inverse_cholesky_upper(hessian)
    work = weight.detach().to(torch.float64).clone()
    mask = torch.zeros(rows, width, dtype=torch.bool, device=weight.device)

    for start in range(0, width, blocksize):
        stop = min(start + blocksize, width)
        block = work[:, start:stop].clone()
        block_upper = upper[start:stop, start:stop]
        pivots = torch.diagonal(block_upper)
        errors = torch.zeros_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if sparsity.pattern is None:
            block_mask = _block_mask(block**2 / pivots**2, sparsity, start, width, rows)
        # error_j = w_j / U_jj where pruned, else 0: one product per column with this factor
        error_factor = block_mask.to(block.dtype) / pivots
        # The same lazy-update idea one level down: columns update the rest of their
        # sub-block eagerly and the rest of the block by one product per sub-block, so
        # the per-column work is rows × sub instead of rows × blocksize (same arithmetic).
        for sub_start in range(0, stop - start, sub):
            sub_stop = min(sub_start + sub, stop - start)
            for column in range(sub_start, sub_stop):
                if sparsity.pattern is not None and column % group == 0:
                    scores = block[:, column : column + group] ** 2 / pivots[column : column + group] ** 2
                    chosen = _lowest(scores, group - sparsity.pattern[0], dim=1)
                    block_mask[:, column : column + group] = chosen
                    error_factor[:, column : column + group] = chosen.to(block.dtype) / pivots[column : column + group]
                error = torch.mul(block[:, column], error_factor[:, column], out=errors[:, column])
                block[:, column:sub_stop].addr_(error, block_upper[column, column:sub_stop], alpha=-1.0)
            block[:, sub_stop:] -= errors[:, sub_start:sub_stop] @ block_upper[sub_start:sub_stop, sub_stop:]
        block[block_mask] = 0.0
        work[:, start:stop] = block
        mask[:, start:stop] = block_mask
        work[:, stop:] -= errors @ upper[start:stop, stop:]

    work[mask] = 0.0
    return work.to(weight.dtype), mask


def _inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹), adding damping until H factorises."""
    jitter = 0.0
    scale = float(torch.diagonal(hessian).mean())
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(hessian + jitter * torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device))
        if int(info) == 0:
            inverse = inverse_from_cholesky(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        jitter = max(jitter * 10, 1e-6 * scale)
    raise UsageError("SparseGPT: the damped Gram matrix is not positive definite; raise the damping")


def sparsegpt_initial_masks(
    weights0: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], sparsity: Sparsity, damp: float = 0.01
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``--init sparsegpt`` for iCBS: SparseGPT's masks, Wanda's scores.

    iCBS's layer-wise QUBO is built on the ORIGINAL weights (docs/icbs.md §5), so only
    SparseGPT's *mask* is kept and its updated weights are dropped: the sequence is
    mask from SparseGPT -> iCBS improves the mask -> ``--refit`` recomputes the kept
    weights for the final mask (without ``--refit`` the kept weights stay original, which
    throws SparseGPT's update away, so always pair this init with ``--refit``).
    iCBS picks its blocks by score (likely mistakes first); Wanda's ``|w|·||a||`` is
    used for that, being the saliency of a weight under the original weights.
    Returns ``(scores, masks)`` keyed like ``weights0``.
    """
    from qsurgeon.server.pruning.masks import score_weights

    scores, masks = {}, {}
    for name, weight0 in weights0.items():
        gram = grams[name]
        norms = torch.diagonal(gram).clamp_min(0.0).sqrt().float()
        scores[name] = score_weights(weight0, "wanda", input_norms=norms)
        _, masks[name] = sparsegpt_prune(weight0, gram, sparsity, damp=max(damp, 1e-6))
    return scores, masks
