"""The least-squares refit: CG agrees with the exact solve, and never makes a row worse."""

import pytest
import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.refit import damped_gram, refit_rows, weight_row_errors


def _layer(rows: int, width: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator)
    # correlated inputs, as real activations are: that is what makes refitting worthwhile
    mixing = torch.randn(width, width, generator=generator) / width**0.5 + torch.eye(width)
    inputs = mixing @ torch.randn(width, tokens, generator=generator, dtype=torch.float64).to(torch.float32)
    gram = (inputs.double() @ inputs.double().T)
    mask = torch.rand(rows, width, generator=generator) < 0.5
    return weight, gram, mask


def _brute_force_row(w0: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Minimise (w − w0)ᵀ H (w − w0) over w with w_P = 0 by a direct dense solve."""
    kept = (~pruned).nonzero().flatten()
    gone = pruned.nonzero().flatten()
    w = torch.zeros_like(w0, dtype=torch.float64)
    w0 = w0.double()
    if kept.numel():
        h_kk = hessian[kept][:, kept]
        h_kp = hessian[kept][:, gone]
        w[kept] = w0[kept] + torch.linalg.solve(h_kk, h_kp @ w0[gone])
    return w


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_refit_matches_direct_solve_row_by_row(method):
    weight, gram, mask = _layer(rows=7, width=12, tokens=40, seed=0)
    refit = refit_rows(weight, gram, mask, damp=0.01, method=method, tol=1e-12)
    hessian = damped_gram(gram, 0.01)
    for row in range(weight.shape[0]):
        expected = _brute_force_row(weight[row], hessian, mask[row])
        torch.testing.assert_close(refit[row].double(), expected, rtol=1e-4, atol=1e-5)
    assert bool((refit[mask] == 0).all())


def test_cg_reaches_the_exact_error_on_a_wider_rank_deficient_layer():
    # fewer tokens than inputs: H is singular, only the damping makes the systems solvable
    weight, gram, mask = _layer(rows=16, width=48, tokens=30, seed=1)
    exact = refit_rows(weight, gram, mask, method="exact")
    hessian = damped_gram(gram, 0.01)
    error_exact = weight_row_errors(weight, exact, hessian)
    # the default tolerance (1e-3 relative residual) costs at most ~1e-4 of the error ...
    error_default = weight_row_errors(weight, refit_rows(weight, gram, mask, method="cg"), hessian)
    assert torch.all(error_default >= error_exact * (1 - 1e-9))
    assert torch.allclose(error_default, error_exact, rtol=1e-4, atol=1e-9)
    # ... and a tighter one reaches the exact error
    error_cg = weight_row_errors(weight, refit_rows(weight, gram, mask, method="cg", tol=1e-5), hessian)
    assert torch.allclose(error_cg, error_exact, rtol=1e-5, atol=1e-9)



def test_float32_cg_reaches_the_float64_error_and_keeps_float64_inputs_float64():
    # CG runs in float32 at tol ≥ 1e-5; it must land on the same error as float64
    weight, gram, mask = _layer(rows=64, width=96, tokens=200, seed=4)
    weight64 = weight.double()
    hessian = damped_gram(gram, 0.01)
    fast = refit_rows(weight64, gram, mask, tol=1e-4)
    careful = refit_rows(weight64, gram, mask, tol=1e-4, cg_dtype=torch.float64)
    exact = refit_rows(weight64, gram, mask, method="exact")
    assert fast.dtype == torch.float64
    error_exact = weight_row_errors(weight64, exact, hessian)
    for refit in (fast, careful):
        assert torch.allclose(weight_row_errors(weight64, refit, hessian), error_exact, rtol=1e-5, atol=1e-9)
    # a tolerance float32 cannot reach switches the iterations to float64 by itself
    tight = refit_rows(weight64, gram, mask, tol=1e-10)
    torch.testing.assert_close(tight, exact, rtol=1e-7, atol=1e-9)

@pytest.mark.parametrize("method", ["exact", "cg"])
def test_refit_never_increases_a_rows_error(method):
    weight, gram, mask = _layer(rows=20, width=24, tokens=64, seed=2)
    refit = refit_rows(weight, gram, mask, method=method)
    mask_only = weight * ~mask
    # the damped objective is minimised exactly; undamped it may differ by the damping only
    hessian = damped_gram(gram, 0.01)
    refit_error, mask_error = weight_row_errors(weight, refit, hessian), weight_row_errors(weight, mask_only, hessian)
    assert bool((refit_error <= mask_error * (1 + 1e-9)).all())
    plain_refit = weight_row_errors(weight, refit, gram)
    plain_mask = weight_row_errors(weight, mask_only, gram)
    assert bool((plain_refit <= plain_mask * (1 + 1e-6) + 1e-9).all())
    assert float(plain_refit.sum()) < 0.8 * float(plain_mask.sum())  # and it helps a lot here


def test_rows_with_nothing_pruned_or_everything_pruned_are_handled():
    weight, gram, _ = _layer(rows=3, width=8, tokens=20, seed=3)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[1] = True
    for method in ("exact", "cg"):
        refit = refit_rows(weight, gram, mask, method=method)
        torch.testing.assert_close(refit[0], weight[0])
        assert bool((refit[1] == 0).all())


def test_dead_inputs_do_not_break_the_solve():
    weight, gram, mask = _layer(rows=5, width=10, tokens=30, seed=4)
    gram[3, :] = 0
    gram[:, 3] = 0
    for method in ("exact", "cg"):
        refit = refit_rows(weight, gram, mask, method=method)
        assert bool(torch.isfinite(refit).all())


def test_bad_inputs_raise_usage_errors():
    weight, gram, mask = _layer(rows=3, width=8, tokens=20, seed=5)
    with pytest.raises(UsageError, match="Gram"):
        refit_rows(weight, gram[:4, :4], mask)
    with pytest.raises(UsageError, match="mask shape"):
        refit_rows(weight, gram, mask[:2])
    with pytest.raises(UsageError, match="bool"):
        refit_rows(weight, gram, mask.float())
    with pytest.raises(UsageError, match="refit method"):
        refit_rows(weight, gram, mask, method="lu")  # type: ignore[arg-type]


def test_undamped_full_rank_and_singular_grams_both_refit():
    # without damping a full-rank Gram is preconditioned by its inverse; a singular one
    # (fewer tokens than inputs) cannot be inverted and falls back to the diagonal
    for tokens in (200, 20):
        weight, gram, mask = _layer(rows=12, width=32, tokens=tokens, seed=7)
        weight64 = weight.double()
        hessian = damped_gram(gram, 0.0)
        refit = refit_rows(weight64, gram, mask, damp=0.0, tol=1e-8, cg_dtype=torch.float64)
        assert torch.isfinite(refit).all()
        assert torch.all(refit[mask] == 0)
        pruned_only = weight64 * ~mask
        refit_error = weight_row_errors(weight64, refit, hessian)
        assert torch.all(refit_error <= weight_row_errors(weight64, pruned_only, hessian) + 1e-9)
        if tokens > 32:  # full rank: the unique optimum, same as the dense solve
            exact = refit_rows(weight64, gram, mask, damp=0.0, method="exact")
            torch.testing.assert_close(refit, exact, rtol=1e-6, atol=1e-8)
