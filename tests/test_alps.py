"""ALPS (pruning/alps.py): exact sparsity, a layer error at most SparseGPT's and Wanda + refit's
on the same Gram, an ADMM that converges, and near-optimal masks where brute force can check."""

from __future__ import annotations

import itertools

import pytest
import torch

from qsurgeon.server.pruning.alps import ALPSTrace, alps_prune
from qsurgeon.server.pruning.masks import check_mask, initial_mask, score_weights
from qsurgeon.server.pruning.refit import refit_rows, weight_row_errors
from qsurgeon.server.pruning.sparsegpt import sparsegpt_prune
from qsurgeon.server.pruning.sparsity import Sparsity


def _layer(out: int = 64, width: int = 96, tokens: int = 1500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer with correlated, unevenly scaled inputs (what makes one-shot scores err)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5 + torch.eye(
        width, dtype=torch.float64)
    scales = torch.exp(torch.randn(width, 1, generator=generator, dtype=torch.float64))
    inputs = (mix @ torch.randn(width, tokens, generator=generator, dtype=torch.float64)) * scales
    weight = torch.randn(out, width, generator=generator)
    return weight, inputs @ inputs.T


def _error(weight0: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    return float(weight_row_errors(weight0, weight, gram).sum())


SPARSITIES = [Sparsity(0.5), Sparsity(0.3), Sparsity.parse(None, "2:4"), Sparsity(0.4, "tensor"),
              Sparsity(0.5, "column")]


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: s.describe())
def test_alps_hits_the_density_exactly_and_beats_the_one_shot_anchors(sparsity):
    weight, gram = _layer()
    new_weight, mask = alps_prune(weight, gram, sparsity)
    check_mask(mask, sparsity)  # exact counts in every group (N:M: every group of 4)
    assert bool((new_weight[mask] == 0).all())
    assert new_weight.dtype == weight.dtype and new_weight.shape == weight.shape
    sparsegpt_weight, _ = sparsegpt_prune(weight, gram, sparsity)
    wanda = initial_mask(score_weights(weight, "wanda", input_norms=gram.diagonal().sqrt().float()), sparsity)
    wanda_refit = refit_rows(weight, gram, wanda)
    alps_error = _error(weight, new_weight, gram)
    assert alps_error <= _error(weight, sparsegpt_weight, gram)
    assert alps_error <= _error(weight, wanda_refit, gram)


def test_admm_converges_the_support_settles_and_the_error_falls():
    weight, gram = _layer(seed=1)
    trace = ALPSTrace()
    alps_prune(weight, gram, Sparsity(0.5), trace=trace)
    assert trace.iterations < 300  # stopped by convergence, not by the cap
    assert trace.support_changes[-1] == 0 and trace.residual[-1] <= 1e-4
    assert trace.rho == sorted(trace.rho)  # the penalty only grows
    # once ρ is large enough to bind, the error of D decreases to its final value
    half = len(trace.error) // 2
    assert trace.error[-1] <= min(trace.error[:half]) * 1.0001
    assert all(later <= earlier * 1.001 for earlier, later in zip(trace.error[half:], trace.error[half + 1:]))


def test_refit_gives_the_least_squares_weights_of_the_mask():
    weight, gram = _layer(seed=2)
    refit, mask = alps_prune(weight, gram, Sparsity(0.5))
    admm, admm_mask = alps_prune(weight, gram, Sparsity(0.5), refit=False)
    assert torch.equal(mask, admm_mask)
    assert torch.allclose(refit, refit_rows(weight, gram, mask))
    assert _error(weight, refit, gram) <= _error(weight, admm, gram) * 1.0001


def test_alps_is_near_the_brute_force_optimum_on_tiny_rows():
    """Rows of 10 weights keeping 5, every one of the 252 masks refit exactly: ALPS is a heuristic
    (ADMM on a non-convex set), but it finds the optimum on most rows and is closer on average
    than Wanda + refit."""
    ratios, wanda_ratios = [], []
    for seed in range(6):
        weight, gram = _layer(out=3, width=10, tokens=60, seed=seed)
        new_weight, mask = alps_prune(weight, gram, Sparsity(0.5), damp=0.0)
        wanda = initial_mask(score_weights(weight, "wanda", input_norms=gram.diagonal().sqrt().float()),
                             Sparsity(0.5))
        wanda_refit = refit_rows(weight, gram, wanda, damp=0.0, method="exact")
        for row in range(weight.shape[0]):
            best = float("inf")
            for kept in itertools.combinations(range(10), 5):
                candidate = torch.ones(1, 10, dtype=torch.bool)
                candidate[0, list(kept)] = False
                fitted = refit_rows(weight[row:row + 1], gram, candidate, damp=0.0, method="exact")
                best = min(best, _error(weight[row:row + 1], fitted, gram))
            ratios.append(_error(weight[row:row + 1], new_weight[row:row + 1], gram) / best)
            wanda_ratios.append(_error(weight[row:row + 1], wanda_refit[row:row + 1], gram) / best)
    assert min(ratios) >= 1 - 1e-6  # nothing beats the exhaustive optimum
    assert sum(ratio <= 1 + 1e-6 for ratio in ratios) >= len(ratios) // 2
    assert sum(ratios) < sum(wanda_ratios)
