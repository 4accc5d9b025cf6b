"""ALPS-style ADMM pruning of one linear layer (Meng, Behdin, Wang, Mazumder, NeurIPS 2024).

Written from the paper's description. The layer problem is the ℓ0-constrained
reconstruction of docs/icbs.md §5,

    min_W  Σ_r (w_r − w0_r)ᵀ H (w_r − w0_r)     s.t.  W obeys the sparsity (row, tensor, column or N:M)

which SparseGPT and Wanda approximate greedily. ALPS splits the variable, ``W = D`` with
``D`` sparse, and runs ADMM on the augmented Lagrangian

    L(W, D, V) = tr((W − W0) H (W − W0)ᵀ) + ⟨V, W − D⟩ + ρ/2 ‖W − D‖²

    W ← (W0 H − V/2 + ρ/2 D) (H + ρ/2 I)⁻¹         (a ridge solve, the same H for every row)
    D ← P(W + V/ρ)                                 (keep the largest entries of every group)
    V ← V + ρ (W − D)

Why ADMM beats one-shot scores: the projection ``P`` sees weights that have already
absorbed the pruned weights' contribution (the ridge solve), and the multiplier ``V``
remembers which constraints kept being violated, so the support can move many times
before it settles, instead of being decided once (Wanda) or column by column (SparseGPT).

**Penalty schedule.** A small ρ lets the support move freely; ρ → ∞ forces ``W = D``
and freezes it. As in the paper, ρ grows geometrically, faster while the support still
changes a lot: every ``update_every`` iterations the number ``s`` of entries whose
kept/pruned status changed since the last check decides the factor (1.3 if ``s`` is at
least 10 % of the pruned count, 1.2 above 0.5 %, 1.1 otherwise). The iteration stops
once the support has not changed over a check and ``‖W − D‖ ≤ tol · ‖D‖``, or at
``max_iter``.

**Scale.** The Gram is first normalised to a unit diagonal, ``Ĥ = S⁻¹ H S⁻¹`` with
``S = diag(√H_jj)``, and the weights are carried as ``Ŵ = W S`` (the error is unchanged).
Then ρ means the same thing for every layer, and the projection ranks ``|w_j|·‖a_j‖``
(Wanda's score of the current iterate) rather than raw magnitudes.

**Cost.** ``H + ρ/2 I`` changes with ρ, so ``Ĥ = Q Λ Qᵀ`` is diagonalised once (in float32:
on 2 cores the float64 ``eigh`` of a 1536-wide Gram cost ten times as much); every ridge
solve is then two ``(rows × in) @ (in × in)`` products. The iterations run in float32 (the
error of the final weights is evaluated in float64).

**Refit.** ADMM's ``W`` is only approximately optimal for the final support; as in the
paper the kept weights are then refit on the support by preconditioned conjugate
gradients (:func:`qsurgeon.server.pruning.refit.refit_rows`, the same damped least squares
as ``--refit``), so the returned weights are the exact least-squares weights of ALPS's mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qsurgeon.server.pruning.masks import initial_mask
from qsurgeon.server.pruning.refit import damped_gram, refit_rows
from qsurgeon.server.pruning.sparsity import Sparsity

#: ρ of the first iteration, relative to the unit diagonal of the normalised Gram
RHO0 = 0.1
#: iterations between penalty updates (and support-change checks)
UPDATE_EVERY = 3
#: most ADMM iterations per layer; on MiniLM's layers the support has settled well before
MAX_ITER = 300


@dataclass
class ALPSTrace:
    """What the iterations did (for tests and the report): per check, ρ, support changes,
    the relative primal residual ‖W − D‖/‖D‖ and the layer error of D (normalised units)."""

    rho: list[float] = field(default_factory=list)
    support_changes: list[int] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)
    iterations: int = 0


def _project(values: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Mask (True = pruned) of the smallest |values| in every constraint group: the Euclidean
    projection onto the sparsity set keeps the largest entries of each group."""
    return initial_mask(values.abs(), sparsity, check=False)  # the shape was checked by the first projection


def alps_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: Sparsity,
    *,
    damp: float = 0.01,
    rho0: float = RHO0,
    update_every: int = UPDATE_EVERY,
    max_iter: int = MAX_ITER,
    tol: float = 1e-4,
    refit: bool = True,
    trace: ALPSTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × in) by ADMM on the layer reconstruction; return ``(new_weight, mask)``.

    ``gram`` is ``A Aᵀ`` of the layer's inputs (in × in); ``damp`` the damping (a fraction
    of the mean diagonal, as in SparseGPT and the refit). ``mask`` is True where pruned
    and meets ``sparsity`` exactly; ``new_weight`` is zero there and, with ``refit``, the
    damped least-squares weights of the kept set elsewhere (else ADMM's ``D``).
    ``trace`` (optional) receives ρ, support changes, residuals and errors per check.
    """
    w0 = weight.detach().to(torch.float64).cpu()
    hessian = damped_gram(gram.detach().cpu(), damp)
    scale = torch.diagonal(hessian).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    normalised = hessian / scale[:, None] / scale[None, :]
    dtype = torch.float32
    h = normalised.to(dtype)
    # in float32, as the iterations: on 2 cores a 1536-wide float64 eigh took 27 s under load
    # where the float32 one took 2.3 s (MiniLM's output projections), and the final weights
    # are the refit's anyway
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    basis = eigenvectors
    lam = eigenvalues.clamp_min(0.0)
    w0n = (w0 * scale).to(dtype)  # Ŵ0 = W0 S
    target = w0n @ h  # Ŵ0 Ĥ, the right-hand side's fixed part

    mask = initial_mask(w0n.abs(), sparsity)  # checked once: finite weights, a shape the sparsity fits
    d = w0n * ~mask
    v = torch.zeros_like(w0n)
    rho = float(rho0)
    pruned_count = max(1, int(mask.sum()))
    last_mask = mask
    iterations = 0
    for iterations in range(1, max_iter + 1):
        # W-step: (Ŵ0 Ĥ − V/2 + ρ/2 D)(Ĥ + ρ/2 I)⁻¹, through the eigenbasis
        right = target - 0.5 * v + (0.5 * rho) * d
        w = ((right @ basis) / (lam + 0.5 * rho)) @ basis.T
        shifted = w + v / rho
        mask = _project(shifted, sparsity)
        d = shifted * ~mask
        v += rho * (w - d)
        if iterations % update_every == 0:
            changes = int((mask != last_mask).sum())
            residual = float(torch.linalg.vector_norm(w - d) / torch.linalg.vector_norm(d).clamp_min(1e-30))
            if trace is not None:
                diff = (d - w0n).to(torch.float64)
                trace.rho.append(rho)
                trace.support_changes.append(changes)
                trace.residual.append(residual)
                trace.error.append(float(((diff @ normalised) * diff).sum()))
            last_mask = mask
            if changes == 0 and residual <= tol:
                break
            if changes >= 0.1 * pruned_count:
                rho *= 1.3
            elif changes >= 0.005 * pruned_count:
                rho *= 1.2
            else:
                rho *= 1.1
    if trace is not None:
        trace.iterations = iterations
    mask = mask.cpu()
    if refit:
        new_weight = refit_rows(weight.detach().cpu(), gram.detach().cpu(), mask, damp)
    else:
        new_weight = (d.to(torch.float64) / scale * ~mask).to(weight.dtype)
    return new_weight.to(weight.dtype).to(weight.device) * ~mask.to(weight.device), mask.to(weight.device)


__all__ = ["ALPSTrace", "MAX_ITER", "RHO0", "UPDATE_EVERY", "alps_prune"]
