"""QUBO builders: block energies equal the directly computed objective, for random masks."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.qubo import fisher_block, layerwise_blocks, row_errors, weighted_sum
from qsurgeon.worker import solve


def _layer(seed: int, out: int = 6, width: int = 12, tokens: int = 40):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator)
    activations = torch.randn(width, tokens, generator=generator, dtype=torch.float64)
    activations[0] *= 5.0  # uneven feature scales, like real layers
    gram = activations @ activations.T
    return weight, activations, gram, generator


def _direct_error(weight: torch.Tensor, activations: torch.Tensor, mask: torch.Tensor) -> float:
    """‖(W − Ŵ) A‖² straight from the weights and the activations."""
    pruned_weight = weight.to(torch.float64) * mask.to(torch.float64)
    return float(((pruned_weight @ activations) ** 2).sum())


def _random_mask(generator, shape, pruned_per_row):
    scores = torch.rand(shape, generator=generator)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.scatter_(1, scores.argsort(dim=1)[:, :pruned_per_row], True)
    return mask


def _assign(mask, rows, cols, x):
    new = mask.clone()
    new[rows, cols] = torch.as_tensor(x, dtype=torch.bool)
    return new


def test_row_errors_match_direct_computation():
    weight, activations, gram, generator = _layer(0)
    mask = _random_mask(generator, weight.shape, 5)
    total = float(row_errors(weight, gram, mask).sum())
    assert total == pytest.approx(_direct_error(weight, activations, mask), rel=1e-10)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_layerwise_row_blocks_energy_is_the_row_error(seed):
    weight, activations, gram, generator = _layer(seed)
    mask = _random_mask(generator, weight.shape, 6)
    block = 8
    rows = torch.arange(weight.shape[0])
    cols = torch.stack([torch.randperm(weight.shape[1], generator=generator)[:block] for _ in rows])
    problems = layerwise_blocks(weight, gram, mask, rows, cols)
    assert len(problems) == len(rows)
    for row, (problem, block_cols) in enumerate(zip(problems, cols)):
        assert np.array_equal(problem.Q, problem.Q.T)
        assert problem.k == int(mask[row, block_cols].sum())
        assert problem.energy(problem.x0) == pytest.approx(_direct_error(weight[row:row + 1], activations,
                                                                          mask[row:row + 1]), rel=1e-5)
        for _ in range(5):  # random feasible reassignments of the block
            x = np.zeros(block, np.uint8)
            x[torch.randperm(block, generator=generator)[: problem.k].numpy()] = 1
            new_mask = _assign(mask, torch.full((block,), row), block_cols, x)
            direct = _direct_error(weight[row:row + 1], activations, new_mask[row:row + 1])
            assert problem.energy(x) == pytest.approx(direct, rel=1e-5)


def test_layerwise_multi_row_blocks_sum_the_touched_rows():
    weight, activations, gram, generator = _layer(4, out=8)
    mask = _random_mask(generator, weight.shape, 6)
    # blocks along a column: entries in different rows, plus one block with two entries in a shared row
    rows = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 6, 7, 7, 0, 1]])
    cols = torch.tensor([[3, 3, 3, 3, 3, 3], [0, 5, 1, 9, 10, 11]])
    problems = layerwise_blocks(weight, gram, mask, rows, cols)
    for problem, block_rows, block_cols in zip(problems, rows, cols):
        touched = block_rows.unique()
        for _ in range(6):
            x = np.zeros(6, np.uint8)
            x[torch.randperm(6, generator=generator)[: problem.k].numpy()] = 1
            new_mask = _assign(mask, block_rows, block_cols, x)
            direct = _direct_error(weight[touched], activations, new_mask[touched])
            assert problem.energy(x) == pytest.approx(direct, rel=1e-5)


def test_layerwise_n_m_groups_keep_counts_per_group():
    weight, activations, gram, generator = _layer(5, width=16)
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    for row in range(weight.shape[0]):  # 2:4
        for start in range(0, 16, 4):
            mask[row, start + torch.randperm(4, generator=generator)[:2]] = True
    cols = torch.tensor([[0, 1, 2, 3, 8, 9, 10, 11]] * weight.shape[0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    problems = layerwise_blocks(weight, gram, mask, torch.arange(weight.shape[0]), cols, groups=groups)
    for row, problem in enumerate(problems):
        assert problem.num_groups == 2 and problem.counts.tolist() == [2, 2]
        best = solve(problem, "exhaustive")
        new_mask = _assign(mask, torch.full((8,), row), cols[row], best.x)
        assert new_mask[row].reshape(4, 4).sum(dim=1).tolist() == [2, 2, 2, 2]
        direct = _direct_error(weight[row:row + 1], activations, new_mask[row:row + 1])
        assert best.energy == pytest.approx(direct, rel=1e-5)
        assert best.energy <= problem.energy(problem.x0) + 1e-9


def test_layerwise_exhaustive_optimum_is_the_brute_force_row_optimum():
    """Solving a block that covers the whole row gives the best mask of that row by brute force."""
    weight, activations, gram, generator = _layer(6, out=2, width=10)
    mask = _random_mask(generator, weight.shape, 5)
    problems = layerwise_blocks(weight, gram, mask, torch.arange(2), torch.arange(10).repeat(2, 1))
    for row, problem in enumerate(problems):
        candidates = []
        for chosen in combinations(range(10), 5):
            row_mask = torch.zeros(1, 10, dtype=torch.bool)
            row_mask[0, list(chosen)] = True
            candidates.append(_direct_error(weight[row:row + 1], activations, row_mask))
        best_direct = min(candidates)
        assert solve(problem, "exhaustive").energy == pytest.approx(best_direct, rel=1e-5)


def test_layerwise_rejects_mismatched_shapes():
    weight, _, gram, _ = _layer(7)
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    with pytest.raises(UsageError, match="rows"):
        layerwise_blocks(weight, gram, mask, torch.arange(3), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(UsageError, match="integer"):
        layerwise_blocks(weight, gram, mask, torch.arange(2), torch.zeros(2, 4))


def _quadratic_model(w0, d, G, g, gamma, ridge, x):
    """γgᵀδ + ½δᵀHδ + λ‖δ‖² with H = GᵀG/N, computed directly (forms H)."""
    H = G.T @ G / G.shape[0]
    delta = -(d + w0 * x)
    return float(gamma * g @ delta + 0.5 * delta @ H @ delta + ridge * delta @ delta)


@pytest.mark.parametrize("samples,block", [(4, 12), (20, 8)])
def test_fisher_block_energy_is_the_quadratic_model(samples, block):
    generator = torch.Generator().manual_seed(samples)
    w0 = torch.randn(block, generator=generator, dtype=torch.float64)
    G = torch.randn(samples, block, generator=generator, dtype=torch.float64)
    g = torch.randn(block, generator=generator, dtype=torch.float64) * 0.3
    x0 = torch.zeros(block, dtype=torch.float64)
    x0[torch.randperm(block, generator=generator)[: block // 2]] = 1
    for d in (-w0 * x0, -w0 * x0 + 0.05 * torch.randn(block, generator=generator, dtype=torch.float64)):
        problem = fisher_block(w0, d, G, g, 0.75, 1e-3, x0=x0)
        assert problem.is_factored and problem.rank == samples  # never B×B
        assert problem.k == block // 2
        for _ in range(6):
            x = torch.zeros(block, dtype=torch.float64)
            x[torch.randperm(block, generator=generator)[: block // 2]] = 1
            direct = _quadratic_model(w0, d, G, g, 0.75, 1e-3, x)
            assert problem.energy(x.numpy()) == pytest.approx(direct, rel=1e-5, abs=1e-6 * abs(direct) + 1e-9)
    assert fisher_block(w0, -w0 * x0, G, g, 0.75, 1e-3, x0=x0).energy(x0.numpy()) == pytest.approx(0.0, abs=1e-9)


def test_fisher_keeps_negative_couplings_and_groups():
    generator = torch.Generator().manual_seed(11)
    w0 = torch.randn(8, generator=generator, dtype=torch.float64)
    G = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    x0 = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    problem = fisher_block(w0, -w0 * x0, G, torch.zeros(8, dtype=torch.float64), 0.75, 0.0, x0=x0, groups=groups)
    dense = problem.dense_Q()
    assert (dense[~np.eye(8, dtype=bool)] < 0).any()  # negative couplings are there
    assert problem.counts.tolist() == [2, 2]


def test_weighted_sum_adds_energies():
    weight, _, gram, generator = _layer(8, out=1, width=10)
    mask = _random_mask(generator, weight.shape, 5)
    cols = torch.arange(10)[None, :]
    layer = layerwise_blocks(weight, gram, mask, torch.tensor([0]), cols)[0]
    w0 = weight[0].to(torch.float64)
    x0 = mask[0].to(torch.float64)
    G = torch.randn(4, 10, generator=generator, dtype=torch.float64)
    fisher = fisher_block(w0, -w0 * x0, G, torch.randn(10, generator=generator, dtype=torch.float64), 0.75, 1e-3,
                          x0=x0)
    total = weighted_sum(layer, fisher, 2.5)
    for _ in range(5):
        x = np.zeros(10, np.uint8)
        x[torch.randperm(10, generator=generator)[:5].numpy()] = 1
        expected = layer.energy(x) + 2.5 * fisher.energy(x)
        assert total.energy(x) == pytest.approx(expected, rel=1e-5)


def test_tracked_row_errors_give_the_same_blocks():
    """With the caller's row errors the field is computed only at block entries: same Q, same offsets."""
    from qsurgeon.server.pruning.qubo import layerwise_arrays

    weight, _, gram, generator = _layer(9, out=10, width=64)
    mask = _random_mask(generator, weight.shape, 32)
    errors = row_errors(weight, gram, mask)
    for rows, cols in (
        (torch.arange(10), torch.stack([torch.randperm(64, generator=generator)[:4] for _ in range(10)])),
        (torch.randperm(10, generator=generator)[:6].repeat(2, 1), torch.tensor([[5] * 6, [40] * 6])),
    ):
        full = layerwise_arrays(weight, gram, mask, rows, cols)
        tracked = layerwise_arrays(weight, gram, mask, rows, cols, row_error=errors)
        assert np.allclose(full[0], tracked[0], rtol=1e-6, atol=1e-6 * np.abs(full[0]).max())
        assert np.array_equal(full[1], tracked[1])
        assert np.allclose(full[2], tracked[2], rtol=1e-9)


def test_layerwise_arrays_write_into_a_given_buffer():
    from qsurgeon.server.pruning.qubo import layerwise_arrays

    weight, _, gram, generator = _layer(4, out=6, width=32)
    mask = _random_mask(generator, weight.shape, 16)
    rows = torch.arange(6)
    cols = torch.stack([torch.randperm(32, generator=generator)[:8] for _ in range(6)])
    fresh = layerwise_arrays(weight, gram, mask, rows, cols)
    out = np.full((6, 8, 8), np.nan, np.float32)
    given = layerwise_arrays(weight, gram, mask, rows, cols, out=out)
    assert given[0] is out and np.array_equal(out, fresh[0])
    assert np.array_equal(given[1], fresh[1]) and np.array_equal(given[2], fresh[2])
    for wrong in (np.empty((6, 8, 7), np.float32), np.empty((6, 8, 8), np.float64),
                  np.empty((6, 8, 16), np.float32)[:, :, :8]):
        with pytest.raises(UsageError, match="out must be"):
            layerwise_arrays(weight, gram, mask, rows, cols, out=wrong)
