"""Initial masks: scores, exact counts per constraint group, and the mask checker."""

from __future__ import annotations

import pytest
import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.pruning.masks import check_mask, initial_mask, score_weights
from qsurgeon.server.pruning.sparsity import Sparsity


def _weight(seed: int = 0, shape=(6, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_scores_follow_their_definitions():
    weight = _weight()
    norms = torch.rand(16) + 0.1
    gradient = torch.randn(6, 16)
    assert torch.equal(score_weights(weight, "magnitude"), weight.abs())
    assert torch.allclose(score_weights(weight, "wanda", input_norms=norms), weight.abs() * norms)
    assert torch.allclose(score_weights(weight, "gradient", gradient=gradient), (weight * gradient).abs())
    first = score_weights(weight, "random", seed=3)
    assert torch.equal(first, score_weights(weight, "random", seed=3))
    assert not torch.equal(first, score_weights(weight, "random", seed=4))


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "wanda"}, "input_norms"),
    ({"method": "wanda", "input_norms": torch.ones(5)}, "5 entries"),
    ({"method": "gradient"}, "gradient"),
    ({"method": "gradient", "gradient": torch.ones(3, 3)}, "shape"),
    ({"method": "taylor"}, "unknown score"),
])
def test_score_errors_say_what_is_wrong(kwargs, match):
    with pytest.raises(UsageError, match=match):
        score_weights(_weight(), **kwargs)


def test_row_mask_prunes_the_lowest_of_each_row():
    scores = _weight(1).abs()
    mask = initial_mask(scores, Sparsity(0.25, "row"))
    assert mask.sum(dim=1).tolist() == [12] * 6  # keep round(0.25 * 16) = 4
    for row in range(6):  # every pruned score is below every kept score of the row
        assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()


def test_tensor_and_column_masks_are_exact():
    scores = _weight(2, (7, 9)).abs()
    tensor_mask = initial_mask(scores, Sparsity(0.4, "tensor"))
    assert int(tensor_mask.sum()) == 63 - round(0.4 * 63)
    assert scores[tensor_mask].max() <= scores[~tensor_mask].min()
    column_mask = initial_mask(scores, Sparsity(0.4, "column"))
    assert column_mask.sum(dim=0).tolist() == [7 - round(0.4 * 7)] * 9
    for col in range(9):
        assert scores[:, col][column_mask[:, col]].max() <= scores[:, col][~column_mask[:, col]].min()


def test_n_m_mask_prunes_in_every_group():
    scores = _weight(3, (4, 16)).abs()
    mask = initial_mask(scores, Sparsity.parse(None, "2:4"))
    groups = mask.reshape(4, 4, 4)
    assert (groups.sum(dim=2) == 2).all()
    grouped_scores = scores.reshape(4, 4, 4)
    assert (torch.where(groups, grouped_scores, -torch.inf).amax(dim=2)
            <= torch.where(~groups, grouped_scores, torch.inf).amin(dim=2)).all()


def test_ties_are_broken_deterministically():
    scores = torch.ones(3, 8)
    mask = initial_mask(scores, Sparsity(0.5))
    assert torch.equal(mask, initial_mask(scores.clone(), Sparsity(0.5)))
    assert mask.sum(dim=1).tolist() == [4, 4, 4]


def test_check_mask_accepts_exact_and_rejects_wrong_counts():
    sparsity = Sparsity(0.5)
    mask = initial_mask(_weight(4).abs(), sparsity)
    check_mask(mask, sparsity, "layer")
    broken = mask.clone()
    broken[2, torch.nonzero(~broken[2])[0]] = True
    with pytest.raises(UsageError, match="layer.*group 2 has 9 pruned, needs 8"):
        check_mask(broken, sparsity, "layer")
    with pytest.raises(UsageError, match="bool"):
        check_mask(mask.float(), sparsity)
    with pytest.raises(UsageError, match="multiple of 4"):
        check_mask(torch.zeros(2, 6, dtype=torch.bool), Sparsity.parse(None, "2:4"))


def test_initial_mask_rejects_bad_scores():
    with pytest.raises(UsageError, match="NaN"):
        initial_mask(torch.tensor([[1.0, float("nan")]]), Sparsity(0.5))
    with pytest.raises(UsageError, match="2-D"):
        initial_mask(torch.ones(4), Sparsity(0.5))
