"""What iCBS minimises: the surrogate of a mask (docs/icbs.md §4, §5) and the layer-wise errors it sums.

The surrogate is computed here and nowhere else, so the value a round's merge keeps up to
date and the value the initial state starts from are the same function of the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qsurgeon.server.engine.icbs.state import TensorContext
from qsurgeon.server.engine.options import ICBSConfig
from qsurgeon.server.pruning.qubo import row_errors


def mask_row_errors(weight0: Tensor, gram: Tensor, mask: Tensor) -> Tensor:
    """Exact layer-wise error of pruning ``mask``, per row: ‖(w0_r∘x_r)ᵀA‖² = (w0∘x)_r H (w0∘x)_rᵀ, float64 (out,)."""
    return row_errors(weight0, gram, mask)


def dense_error(weight0: Tensor, gram: Tensor) -> float:
    """Σ_rows w0ᵀHw0 = ‖W0 A‖²: the error of pruning everything, the denominator of relative errors."""
    return float(mask_row_errors(weight0, gram, torch.ones(weight0.shape, dtype=torch.bool)).sum())


def relative_layer_error(weight0: Tensor, gram: Tensor, mask: Tensor) -> float:
    """Σ_rows e / Σ_rows w0ᵀHw0 for one tensor: ‖(W − Ŵ)A‖² / ‖WA‖²."""
    return float(mask_row_errors(weight0, gram, mask).sum()) / max(dense_error(weight0, gram), 1e-300)


def surrogate(context: TensorContext, mask: Tensor, config: ICBSConfig, rows: Tensor | None = None) -> float:
    """The tensor's surrogate; ``rows`` limits the layer-wise recomputation to rows that changed."""
    value = 0.0
    if context.gram is not None:
        linear, constant = context.task.linear, context.task.constant
        if context.row_error is None or rows is None:
            context.row_error = row_errors(context.weight, context.gram, mask, linear, constant)
        elif rows.numel():
            context.row_error[rows] = row_errors(context.weight[rows], context.gram, mask[rows],
                                                 None if linear is None else linear[rows],
                                                 None if constant is None else constant[rows])
        value += float(context.row_error.sum())
    if context.fisher_g is not None:
        weight = config.fisher_weight if config.objective == "layerwise+fisher" else 1.0
        value += weight * _fisher_model(context, mask, config)
    return value


def _fisher_model(context: TensorContext, mask: Tensor, config: ICBSConfig) -> float:
    change = (context.weight * (~mask).to(torch.float64)).reshape(-1) - context.reference
    projected = context.fisher_g @ change
    return float(config.gamma * (context.fisher_grad @ change)
                 + 0.5 * (projected @ projected) / context.fisher_g.shape[0])


__all__ = ["dense_error", "mask_row_errors", "relative_layer_error", "surrogate"]
