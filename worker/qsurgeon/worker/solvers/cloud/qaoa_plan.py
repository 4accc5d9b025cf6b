"""QAOA for gate-model cloud devices: angles chosen locally, one sampling task per block.

On a cloud device every optimiser iteration would be a paid task and a queue wait, so
the angles (γ, β per layer) are optimised here on an exact statevector of the penalised
block (COBYLA from seeded random angles; B ≤ 20 qubits is at most 2²⁰ amplitudes), and the
device then samples the one resulting circuit. What the device contributes is the
sampling of that circuit, noise included; what comes back is repaired and scored as for
every penalty backend (penalty.py).

Conventions, shared by the statevector here and the circuits the SDK modules build, so
the two describe the same state: qubit i is variable i; x_i = 1 is |1⟩; the cost layer is
exp(−iγ·P̃(x)) with P̃ the penalised QUBO scaled to unit hard bound (penalty.py), written
as the Ising terms Σ h_i Z_i + Σ J_ij Z_i Z_j (RZ(2γh_i), RZZ(2γJ_ij), up to a global
phase); the mixer is RX(2β) on every qubit, after a Hadamard on each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from qsurgeon.client.errors import ProblemTooLargeError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.base import Param
from qsurgeon.worker.solvers.penalty import PenaltyModel

#: Exact angle optimisation simulates 2^B amplitudes.
MAX_PLAN_QUBITS = 20
MAX_REPS = 10


def qaoa_parameters(reps: int, maxiter: int, shots: int, alpha: Any) -> tuple[Param, ...]:
    """What both gate-model backends take (their defaults from the constructor)."""
    return (
        Param("reps", "int", "QAOA layers (p)", reps, minimum=1, maximum=MAX_REPS),
        Param("maxiter", "int", "COBYLA iterations of the local angle optimisation", maxiter, minimum=1,
              maximum=10_000),
        Param("shots", "int", "shots of the one circuit each block sends", shots, minimum=1, maximum=100_000),
        Param("restarts", "int", "alias of shots", minimum=1, maximum=100_000),
        Param("alpha", "alpha", "penalty factor, relative to the block's scale, or 'hard'", alpha),
    )


@dataclass
class QAOAPlan:
    """A block's penalised model, its Ising terms and the optimised angles."""

    model: PenaltyModel
    linear: np.ndarray  # h_i of the scaled penalised model
    couplings: list[tuple[int, int, float]]  # (i, j, J_ij), i < j, J ≠ 0
    gammas: np.ndarray
    betas: np.ndarray
    expected: float  # ⟨P⟩ in the block's units at the chosen angles (exact statevector)
    evaluations: int

    @property
    def num_qubits(self) -> int:
        return self.model.problem.num_variables

    def metadata(self) -> dict[str, Any]:
        return {**self.model.metadata(), "qubits": self.num_qubits, "reps": len(self.gammas),
                "gammas": self.gammas.tolist(), "betas": self.betas.tolist(),
                "expected_penalised_energy": self.expected, "angle_evaluations": self.evaluations,
                "angles": "optimised locally on an exact statevector"}


def ising_terms(matrix: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """h, J of xᵀMx under x = (1 − z)/2 (M symmetric), dropping the constant."""
    size = len(matrix)
    off = matrix - np.diag(np.diagonal(matrix))
    linear = -0.5 * np.diagonal(matrix) - 0.5 * off.sum(axis=1)
    rows, cols = np.triu_indices(size, 1)
    couplings = [(int(i), int(j), float(0.5 * matrix[i, j])) for i, j in zip(rows, cols) if matrix[i, j] != 0.0]
    return linear, couplings


def basis_costs(matrix: np.ndarray, offset: float) -> np.ndarray:
    """xᵀMx + offset of every basis state s (bit i of s is x_i)."""
    size = len(matrix)
    states = np.arange(2 ** size, dtype=np.int64)
    bits = ((states[:, None] >> np.arange(size)) & 1).astype(np.float64)
    return np.einsum("nb,nb->n", bits @ matrix, bits) + offset


def qaoa_state(costs: np.ndarray, gammas: np.ndarray, betas: np.ndarray, size: int) -> np.ndarray:
    """The QAOA statevector, indexed by basis state s (bit i of s is qubit i)."""
    psi = np.full(2 ** size, 2.0 ** (-size / 2), dtype=np.complex128)
    for gamma, beta in zip(gammas, betas):
        psi = psi * np.exp(-1j * gamma * costs)
        tensor = psi.reshape((2,) * size)  # axis k is bit size−1−k
        cos, sin = np.cos(beta), -1j * np.sin(beta)
        for axis in range(size):
            zero = np.take(tensor, 0, axis=axis)
            one = np.take(tensor, 1, axis=axis)
            tensor = np.stack((cos * zero + sin * one, sin * zero + cos * one), axis=axis)
        psi = tensor.reshape(-1)
    return psi


def plan(problem: BlockProblem, alpha: Any, reps: int, maxiter: int, seed: int | None,
         limit: int = MAX_PLAN_QUBITS) -> QAOAPlan:
    """Penalise the block, and optimise the angles of a p = ``reps`` QAOA on it exactly."""
    size = problem.num_variables
    if size > limit:
        raise ProblemTooLargeError(f"QAOA needs one qubit per variable, and angles are optimised on a local "
                                   f"statevector: {size} variables is above {limit}")
    model = PenaltyModel.build(problem, alpha, limit)
    matrix, offset = model.penalised_qubo()
    costs = basis_costs(matrix, offset)
    evaluations = 0

    def expectation(angles: np.ndarray) -> float:
        nonlocal evaluations
        evaluations += 1
        psi = qaoa_state(costs, angles[:reps], angles[reps:], size)
        return float(np.dot(np.abs(psi) ** 2, costs))

    rng = np.random.default_rng(seed)
    start = np.concatenate([rng.uniform(0.0, np.pi, reps), rng.uniform(0.0, np.pi / 2, reps)])
    result = minimize(expectation, start, method="COBYLA", options={"maxiter": maxiter})
    angles = np.asarray(result.x, dtype=np.float64)
    linear, couplings = ising_terms(matrix)
    expected = expectation(angles) * model.scale + problem.offset
    return QAOAPlan(model, linear, couplings, angles[:reps], angles[reps:], expected, evaluations)


__all__ = ["MAX_PLAN_QUBITS", "QAOAPlan", "basis_costs", "ising_terms", "plan", "qaoa_parameters", "qaoa_state"]
