"""SparseGPT against the sequential OBS computed the slow, obvious way; exact densities."""

import pytest
import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.refit import damped_gram, weight_row_errors
from qsurgeon.server.pruning.sparsegpt import sparsegpt_prune
from qsurgeon.server.pruning.sparsity import Sparsity


def _layer(rows: int, width: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5 + torch.eye(width)
    inputs = mixing @ torch.randn(width, tokens, generator=generator, dtype=torch.float64)
    return weight, inputs @ inputs.T


def _slow_obs(weight, gram, sparsity, blocksize, damp):
    """Row by row, column by column, with an explicit inverse of H over the unvisited columns.

    Pruning w_j moves the unvisited weights by −w_j/[H_F⁻¹]_00 · [H_F⁻¹]_{:,0}
    (F = j, j+1, …); a kept weight moves nothing. Mask: at each block start (or N:M
    group start) prune the lowest saliencies w_j² / [H_F⁻¹]_00 of the current weights.
    """
    hessian = damped_gram(gram, damp)
    rows, width = weight.shape
    inverse_diag = torch.tensor([float(torch.linalg.inv(hessian[j:, j:])[0, 0]) for j in range(width)], dtype=torch.float64)
    per_row = sparsity.pruned_per_group(width)
    result = weight.clone()
    mask = torch.zeros(rows, width, dtype=torch.bool)
    group = sparsity.pattern[1] if sparsity.pattern else None
    for row in range(rows):
        w = result[row]
        for j in range(width):
            starts_group = group is not None and j % group == 0
            starts_block = group is None and j % blocksize == 0
            if starts_group or starts_block:
                stop = min(j + (group or blocksize), width)
                count = (group - sparsity.pattern[0]) if group else round(per_row * stop / width) - round(per_row * j / width)
                saliency = w[j:stop] ** 2 / inverse_diag[j:stop]
                order = sorted(range(stop - j), key=lambda i: (float(saliency[i]), i))
                for i in order[:count]:
                    mask[row, j + i] = True
            if mask[row, j]:
                inverse = torch.linalg.inv(hessian[j:, j:])
                w[j:] = w[j:] - w[j] / inverse[0, 0] * inverse[:, 0]
                w[j] = 0.0
    return result, mask


@pytest.mark.parametrize(
    "sparsity, blocksize",
    [
        (Sparsity(0.5), 128),  # one block: the mask is chosen once, up front
        (Sparsity(0.5), 4),  # two blocks: the second is scored on updated weights
        (Sparsity(0.375), 3),  # uneven blocks and counts spread by cumulative rounding
        (Sparsity.parse(None, "2:4"), 4),
        (Sparsity.parse(None, "1:4"), 2),  # block rounded up to M
    ],
)
def test_matches_the_slow_sequential_obs_on_a_6x8_layer(sparsity, blocksize):
    weight, gram = _layer(6, 8, 20, seed=0)
    pruned, mask = sparsegpt_prune(weight, gram, sparsity, blocksize=blocksize, damp=0.01)
    expected_weight, expected_mask = _slow_obs(weight, gram, sparsity, blocksize, damp=0.01)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected_weight, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("granularity", ["row", "column", "tensor"])
@pytest.mark.parametrize("density", [0.5, 0.3])
def test_unstructured_density_is_exact(granularity, density):
    weight, gram = _layer(20, 36, 60, seed=1)
    sparsity = Sparsity(density, granularity)
    pruned, mask = sparsegpt_prune(weight.float(), gram, sparsity, blocksize=8)
    assert pruned.dtype == torch.float32
    assert bool((pruned[mask] == 0).all())
    if granularity == "row":
        assert (mask.sum(dim=1) == sparsity.pruned_per_group(36)).all()
    elif granularity == "column":
        assert (mask.sum(dim=0) == sparsity.pruned_per_group(20)).all()
    else:
        assert int(mask.sum()) == sparsity.pruned_per_group(20 * 36)


def test_n_m_groups_are_exact():
    weight, gram = _layer(10, 32, 50, seed=2)
    pruned, mask = sparsegpt_prune(weight, gram, Sparsity.parse(None, "2:4"), blocksize=12)
    assert (mask.reshape(10, 8, 4).sum(dim=2) == 2).all()
    assert bool((pruned[mask] == 0).all())


def test_beats_magnitude_pruning_on_layer_error():
    weight, gram = _layer(16, 32, 80, seed=3)
    # a few loud input features, as in real activations: magnitude ignores them, OBS does not
    scales = torch.ones(32, dtype=torch.float64)
    scales[::5] = 6.0
    gram = gram * scales[:, None] * scales[None, :]
    sparsity = Sparsity(0.5)
    pruned, _ = sparsegpt_prune(weight, gram, sparsity)
    threshold = weight.abs().kthvalue(sparsity.pruned_per_group(32), dim=1, keepdim=True).values
    magnitude = weight * (weight.abs() > threshold)
    assert float(weight_row_errors(weight, pruned, gram).sum()) \
        < 0.5 * float(weight_row_errors(weight, magnitude, gram).sum())


def test_bad_inputs():
    weight, gram = _layer(4, 8, 10, seed=4)
    with pytest.raises(UsageError, match="Gram"):
        sparsegpt_prune(weight, gram[:4, :4], Sparsity(0.5))
    with pytest.raises(UsageError, match="Sparsity"):
        sparsegpt_prune(weight, gram, 0.5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="multiple of 4"):
        sparsegpt_prune(weight[:, :6], gram[:6, :6], Sparsity.parse(None, "2:4"))


def test_initial_masks_for_icbs_are_sparsegpts_masks_with_wanda_scores():
    from qsurgeon.server.pruning.sparsegpt import sparsegpt_initial_masks

    weight, gram = _layer(6, 16, 30, seed=5)
    sparsity = Sparsity(0.5)
    scores, masks = sparsegpt_initial_masks({"w": weight.float()}, {"w": gram}, sparsity)
    _, expected = sparsegpt_prune(weight.float(), gram, sparsity)
    assert torch.equal(masks["w"], expected)
    torch.testing.assert_close(scores["w"], (weight.abs() * gram.diagonal().sqrt()).float())
