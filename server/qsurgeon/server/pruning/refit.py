"""Least-squares refit of the kept weights of a pruned linear layer (docs/icbs.md §5).

Pruning a row changes its output by ``(w0 ∘ x)ᵀ a``; with the calibration Gram
``H = A Aᵀ`` the layer-wise error of row weights ``w`` is ``(w − w0)ᵀ H (w − w0)``.
Once the mask is fixed, the kept weights ``K`` that minimise it are

    ŵ_K = w0_K + H[K,K]⁻¹ H[K,P] w0_P          (P = pruned, ŵ_P = 0)

which is the OBS / SparseGPT weight update. Rows have different kept sets, so every
row is its own linear system. Two solvers:

- ``"exact"``: a dense solve per row (batched in chunks). Simple and exact, but it
  costs O(rows · d³) and docs/quality.md records ~20 s per wide layer.
- ``"cg"``: preconditioned conjugate gradients on all rows at once. Each iteration is two
  ``(rows × d) @ (d × d)`` products with the kept entries masked, so the whole layer
  advances together. The preconditioner is ``H⁻¹`` restricted to the kept set (one
  inverse per layer, shared by every row; Jacobi if ``H`` is singular): on MiniLM's
  1536-input layers it reaches the exact error in ~30 iterations where the diagonal
  (Jacobi) preconditioner needs ~200, so a layer costs about 3× less.

Damping adds ``damp · mean(diag H)`` to the diagonal (as SparseGPT does): it keeps
``H[K,K]`` invertible when inputs are rank-deficient (few tokens, dead features) and
shrinks the update towards ``w0``. The damped objective is what both solvers
minimise exactly, so the refit never increases the damped error of a row.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

from qsurgeon.client.errors import UsageError

RefitMethod = Literal["cg", "exact"]
REFIT_METHODS: tuple[str, ...] = ("cg", "exact")

#: bytes of float64 matrices one chunk of the exact solver may allocate
_EXACT_CHUNK_BYTES = 256 << 20


def damped_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in float64; dead inputs get a unit diagonal.

    A feature that is zero on every calibration token has a zero row and column in
    ``H``; giving it a positive diagonal keeps every principal submatrix invertible
    without changing any error (its weight never affects the output).
    """
    hessian = gram.to(torch.float64).clone()
    diagonal = torch.diagonal(hessian)
    dead = diagonal <= 0
    if bool(dead.all()):
        diagonal.fill_(1.0)
        return hessian
    diagonal[dead] = 1.0 if damp <= 0 else 0.0
    diagonal += damp * float(diagonal[~dead].mean())
    return hessian


def dense_targets(weights0: Sequence[torch.Tensor], gram: torch.Tensor, cross: torch.Tensor,
                  damp: float) -> list[torch.Tensor]:
    """The weights ``W0'`` towards which the layer error is the error against the dense model's output,
    for every layer in ``weights0`` that reads the input of ``gram`` and ``cross``.

    ``A`` are the layer's inputs in the pruned model, ``Ā`` the same tokens' inputs in the
    dense model, ``H = A Aᵀ`` and ``C = A Āᵀ``. The ridge fit of the dense output,
    ``min_W ‖W A − W0 Ā‖² + λ‖W − W0‖²``, is solved by ``(H + λI) W0'ᵀ = C W0ᵀ + λ W0ᵀ``, and
    for every ``W``: ``‖W A − W0 Ā‖² + λ‖W − W0‖² = (W − W0')(H + λI)(W − W0')ᵀ + const``
    (row by row). So every method that minimises ``(w − w0)ᵀ H (w − w0)`` fits the dense output
    when given ``W0'`` as ``w0``. The ridge pulls towards ``W0``, not towards 0: where the two
    streams agree (``C = H``) ``W0' = W0`` exactly. ``damp`` is λ as a fraction of mean(diag H).
    One Cholesky factorisation serves every layer (q, k and v read the same input).
    """
    factor = torch.linalg.cholesky(damped_gram(gram, damp))
    difference = cross.to(torch.float64) - gram.to(torch.float64)
    targets = []
    for weight0 in weights0:
        w0 = weight0.detach().to(torch.float64)
        # ridge towards W0 (not towards 0): (H + λI) W0'ᵀ = C W0ᵀ + λ W0ᵀ = (C − H) W0ᵀ + (H + λI) W0ᵀ
        targets.append((w0 + torch.cholesky_solve(difference @ w0.T, factor).T).to(weight0.dtype).contiguous())
    return targets


def inverse_from_cholesky(factor: torch.Tensor) -> torch.Tensor:
    """``H⁻¹`` from the lower Cholesky factor of ``H``.

    Same result as ``torch.cholesky_inverse``, but that routine is ~10× slower on CPU in
    float64 (3.3 s vs 0.4 s at 1536 × 1536, measured here), and both the refit and
    SparseGPT invert one Gram per layer.
    """
    identity = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.cholesky_solve(identity, factor)


def _check_inputs(weight0: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, damp: float) -> None:
    if weight0.ndim != 2:
        raise UsageError(f"refit needs a 2-D weight (out, in), got shape {tuple(weight0.shape)}")
    width = weight0.shape[1]
    if tuple(gram.shape) != (width, width):
        raise UsageError(f"Gram matrix must be {width}×{width} for weight {tuple(weight0.shape)}, got {tuple(gram.shape)}")
    if tuple(mask.shape) != tuple(weight0.shape):
        raise UsageError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight0.shape)}")
    if mask.dtype != torch.bool:
        raise UsageError(f"mask must be a bool tensor (True = pruned), got {mask.dtype}")
    if not damp >= 0:
        raise UsageError(f"damping must be non-negative, got {damp}")


def refit_rows(
    weight0: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    damp: float = 0.01,
    method: RefitMethod = "cg",
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    cg_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Refit the kept weights of every row by damped least squares; pruned ones become 0.

    ``weight0`` (out × in) are the ORIGINAL weights, ``gram`` the input Gram ``A Aᵀ``
    (in × in), ``mask`` True where pruned. Returns a tensor of ``weight0``'s dtype and
    device. ``tol`` (relative residual) and ``max_iter`` only apply to ``"cg"``; at the
    default 1e-3 the error of a MiniLM block's six layers is within 6e-6 (relative; 1.4e-4
    on the widest layer) of the exact solve's, a third less work than 1e-4, measured
    on block 0 at density 0.5 (at 1e-4: within 1e-8).

    ``cg_dtype``: the precision of the CG iterations (the right-hand side and the final
    ``w0 + δ`` stay float64); default float32 when ``tol ≥ 1e-5``, float64 for tighter
    tolerances that float32 rounding could not reach. float32 halves the cost of every
    ``(rows × d) @ (d × d)`` product; a relative residual of 1e-4 is far above float32's rounding, and on
    MiniLM's layers it reached the same error as float64 CG (1212.1937 vs 1212.1943 on
    a 1536-input layer) 2–3× faster.
    """
    _check_inputs(weight0, gram, mask, damp)
    if method not in REFIT_METHODS:
        raise UsageError(f"refit method must be one of {', '.join(REFIT_METHODS)}, got {method!r}")
    hessian = damped_gram(gram.to(weight0.device), damp)
    w0 = weight0.detach().to(torch.float64)
    kept = (~mask).to(torch.float64)
    # right-hand side of H[K,K] δ_K = H[K,P] w0_P, laid out as full-width rows
    rhs = (w0 * (1.0 - kept)) @ hessian * kept
    if method == "exact":
        delta = _solve_exact(hessian, kept, rhs)
    else:
        if cg_dtype is None:
            cg_dtype = torch.float32 if tol >= 1e-5 else torch.float64
        kept_cg = kept.to(cg_dtype)
        delta = _solve_cg(hessian.to(cg_dtype), _preconditioner(hessian, kept_cg), kept_cg, rhs.to(cg_dtype),
                          tol=tol, max_iter=max_iter or 4 * w0.shape[1]).to(torch.float64)
    refit = (w0 + delta) * kept
    return refit.to(weight0.dtype)


def _solve_exact(hessian: torch.Tensor, kept: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Dense solve of every row's kept system, padded to full width.

    Each row's matrix is ``H`` restricted to its kept set with an identity on the pruned
    entries, so one batched ``torch.linalg.solve`` handles rows with different kept sets.
    """
    rows, width = kept.shape
    chunk = max(1, _EXACT_CHUNK_BYTES // (8 * width * width))
    delta = torch.zeros_like(rhs)
    identity = torch.eye(width, dtype=hessian.dtype, device=hessian.device)
    for start in range(0, rows, chunk):
        keep = kept[start : start + chunk]
        systems = keep[:, :, None] * hessian[None] * keep[:, None, :]
        systems = systems + identity * (1.0 - keep)[:, None, :]
        delta[start : start + chunk] = torch.linalg.solve(systems, rhs[start : start + chunk])
    return delta


def _preconditioner(hessian: torch.Tensor, kept: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``r ↦ (r H⁻¹) ∘ k`` per row, or Jacobi ``r ↦ r / diag H`` when ``H`` is singular (no damping).

    ``(H⁻¹)[K,K]`` is SPD, so it is a valid CG preconditioner, and a close one:
    ``H[K,K]⁻¹ = (H⁻¹)[K,K] − (H⁻¹)[K,P] ((H⁻¹)[P,P])⁻¹ (H⁻¹)[P,K]``, whose second term is
    small when the pruned inputs are weakly coupled to the kept ones.
    """
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) == 0:
        inverse = inverse_from_cholesky(factor).to(kept.dtype)
        return lambda residual: (residual @ inverse) * kept
    tiny = torch.finfo(kept.dtype).tiny
    inverse_diagonal = (1.0 / torch.diagonal(hessian).clamp_min(tiny)).to(kept.dtype)
    return lambda residual: residual * inverse_diagonal


def _solve_cg(
    hessian: torch.Tensor, precondition: Callable[[torch.Tensor], torch.Tensor], kept: torch.Tensor,
    rhs: torch.Tensor, *, tol: float, max_iter: int
) -> torch.Tensor:
    """Conjugate gradients for all rows at once, each restricted to its kept entries.

    The operator of row r is ``v ↦ (v @ H) ∘ k_r`` on vectors supported on ``k_r``
    (``H`` is symmetric), which is ``H[K,K]`` padded with zeros: SPD on the kept
    subspace, so CG converges there. Per-row step sizes keep rows independent; rows that have
    converged stop moving (their step is masked to zero).
    """
    tiny = torch.finfo(rhs.dtype).tiny
    delta = torch.zeros_like(rhs)
    residual = rhs.clone()
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    rz = (residual * preconditioned).sum(dim=1)
    threshold = (tol**2) * (residual * residual).sum(dim=1).clamp_min(tiny)
    for _ in range(max_iter):
        active = (residual * residual).sum(dim=1) > threshold
        if not bool(active.any()):
            break
        product = (direction @ hessian) * kept
        curvature = (direction * product).sum(dim=1)
        alpha = torch.where(active & (curvature > 0), rz / curvature.clamp_min(tiny), 0.0)
        delta += alpha[:, None] * direction
        residual -= alpha[:, None] * product
        preconditioned = precondition(residual)
        rz_next = (residual * preconditioned).sum(dim=1)
        beta = torch.where(active, rz_next / rz.clamp_min(tiny), 0.0)
        direction = preconditioned + beta[:, None] * direction
        rz = rz_next
    return delta


def refit_search_terms(weight0: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor,
                       damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer-wise QUBO of a mask scored with the REFIT weights of ``mask`` (``--search-on refit``).

    Let ``u`` be the refit of ``mask`` (its kept weights; for ALPS's mask, ALPS's own weights)
    and ``e0 = u − w0`` its residual. Every weight gets a value ``ũ``: a kept one its refit
    value, a pruned one ``v_j = −(e0 H)_j / H_jj``, the best value for restoring it alone. A
    candidate mask ``x`` is then scored by

        U(x) = ((ũ∘(1 − x) − w0)ᵀ H (ũ∘(1 − x) − w0))      per row,

    the error of keeping ``ũ`` on the kept set of ``x``: exact at ``x = mask`` (it is the
    refit's error there) and, since refitting ``x`` can only lower it, an upper bound of
    the error after the refit everywhere. A search that lowers ``U`` followed by the refit
    therefore lowers the refit error (majorise–minimise), whereas the usual form
    ``(w0∘x)ᵀ H (w0∘x)`` (kept weights fixed at w0) can prefer masks that the refit makes worse.

    With ``c = ũ − w0``, ``U(x) = (ũ∘x)ᵀ H (ũ∘x) − 2 Σ_j x_j ũ_j (cH)_j + cᵀHc``: the usual
    QUBO with weights ``ũ``, a per-entry linear term and a per-row constant. Returns
    ``(ũ, linear, constant)`` in float64 and the refit ``u`` itself (``weight0``'s dtype).
    """
    hessian = gram.detach().to(torch.float64)
    w0 = weight0.detach().to(torch.float64)
    pruned = mask.to(torch.float64)
    refitted = refit_rows(weight0, gram, mask, damp)
    refit = refitted.to(torch.float64)
    field = (refit - w0) @ hessian
    diagonal = torch.diagonal(hessian)
    restore = torch.where(diagonal > 0, -field / diagonal.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    values = refit + restore * pruned
    target = values - w0
    target_field = target @ hessian
    return values, -2.0 * values * target_field, (target * target_field).sum(dim=1), refitted


def weight_row_errors(weight0: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row layer-wise error of replacing ``weight0`` by ``weight`` (after a refit, say):
    ``(w − w0)ᵀ H (w − w0)`` in float64, one value per row."""
    difference = (weight.to(torch.float64) - weight0.to(torch.float64))
    return ((difference @ gram.to(torch.float64)) * difference).sum(dim=1)
