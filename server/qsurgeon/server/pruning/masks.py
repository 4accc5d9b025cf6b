"""Initial (one-shot) pruning masks: score every weight, prune the lowest scores.

docs/icbs.md §2. A mask is a bool tensor shaped like the weight, ``True`` = pruned. The
pruned count is exact within every constraint group of the :class:`Sparsity`
(the whole tensor, each row, each column, or each N:M group of a row), because iCBS
only ever swaps inside a group afterwards and so keeps whatever count it starts from.
Ties are broken by position (stable sort) so the same scores always give the same mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.sparsity import Sparsity

SCORE_METHODS: tuple[str, ...] = ("magnitude", "wanda", "gradient", "random")


def _check_matrix(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise UsageError(f"{name} must be a 2-D tensor (out, in), got {shape}")


def score_weights(
    weight: Tensor,
    method: str,
    *,
    input_norms: Tensor | None = None,
    gradient: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Importance of every weight (higher = more important to keep), float32, shaped like ``weight``.

    ``magnitude`` |w|; ``wanda`` |w|·‖a_j‖₂ with ``input_norms`` the L2 norm of each input
    feature over the calibration tokens; ``gradient`` |w·g| (first-order loss change of
    zeroing w); ``random`` uniform noise from ``seed`` alone (ablations), so reruns agree.
    """
    _check_matrix("weight", weight)
    magnitude = weight.detach().abs().float()
    if method == "magnitude":
        return magnitude
    if method == "wanda":
        if input_norms is None:
            raise UsageError("score 'wanda' needs input_norms (the L2 norm of each input feature)")
        norms = input_norms.detach().reshape(-1).float()
        if norms.shape[0] != weight.shape[1]:
            raise UsageError(f"input_norms has {norms.shape[0]} entries but the weight has {weight.shape[1]} inputs")
        return magnitude * norms[None, :]
    if method == "gradient":
        if gradient is None:
            raise UsageError("score 'gradient' needs the loss gradient of the weight")
        if gradient.shape != weight.shape:
            raise UsageError(f"gradient shape {tuple(gradient.shape)} differs from weight shape {tuple(weight.shape)}")
        return (weight.detach().float() * gradient.detach().float()).abs()
    if method == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return torch.rand(weight.shape, generator=generator)
    raise UsageError(f"unknown score method {method!r}; choose one of: {', '.join(SCORE_METHODS)}")


def _prune_lowest_per_row(scores: Tensor, pruned_per_row: int) -> Tensor:
    """Mask pruning the ``pruned_per_row`` lowest entries of every row of a 2-D score matrix."""
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if pruned_per_row > 0:
        order = torch.argsort(scores, dim=1, stable=True)
        mask.scatter_(1, order[:, :pruned_per_row], True)
    return mask


def initial_mask(scores: Tensor, sparsity: Sparsity, *, check: bool = True) -> Tensor:
    """Prune the lowest scores within each constraint group so every group's count is exact.

    ``check=False`` skips the input checks (finite scores, shape) for callers that project
    many times onto one checked shape (ALPS, every ADMM iteration); the result is the same.
    """
    if check:
        _check_matrix("scores", scores)
        if not torch.isfinite(scores).all():
            raise UsageError("scores contain NaN or infinite values")
        sparsity.check_shape(tuple(scores.shape))
    scores = scores.detach().float().cpu()
    rows, cols = scores.shape
    if sparsity.pattern is not None:
        m = sparsity.pattern[1]
        grouped = scores.reshape(rows * cols // m, m)
        return _prune_lowest_per_row(grouped, sparsity.pruned_per_group(m)).reshape(rows, cols)
    if sparsity.granularity == "row":
        return _prune_lowest_per_row(scores, sparsity.pruned_per_group(cols))
    if sparsity.granularity == "column":
        return _prune_lowest_per_row(scores.T.contiguous(), sparsity.pruned_per_group(rows)).T.contiguous()
    flat = scores.reshape(1, -1)
    return _prune_lowest_per_row(flat, sparsity.pruned_per_group(rows * cols)).reshape(rows, cols)


def group_counts(mask: Tensor, sparsity: Sparsity) -> tuple[Tensor, int]:
    """Pruned count of every constraint group of ``mask`` and the count each must have."""
    rows, cols = mask.shape
    if sparsity.pattern is not None:
        m = sparsity.pattern[1]
        return mask.reshape(-1, m).sum(dim=1), sparsity.pruned_per_group(m)
    if sparsity.granularity == "row":
        return mask.sum(dim=1), sparsity.pruned_per_group(cols)
    if sparsity.granularity == "column":
        return mask.sum(dim=0), sparsity.pruned_per_group(rows)
    return mask.sum().reshape(1), sparsity.pruned_per_group(rows * cols)


def check_mask(mask: Tensor, sparsity: Sparsity, name: str = "weight") -> None:
    """Raise UsageError unless ``mask`` is a 2-D bool tensor with the exact count in every group."""
    _check_matrix(f"mask of {name}", mask)
    if mask.dtype != torch.bool:
        raise UsageError(f"mask of {name} must be bool (True = pruned), got {mask.dtype}")
    sparsity.check_shape(tuple(mask.shape), name)
    counts, expected = group_counts(mask, sparsity)
    wrong = torch.nonzero(counts != expected).reshape(-1)
    if wrong.numel():
        group = int(wrong[0])
        raise UsageError(
            f"mask of {name} breaks {sparsity.describe()}: group {group} has {int(counts[group])} pruned, "
            f"needs {expected} ({wrong.numel()} group(s) wrong)"
        )
