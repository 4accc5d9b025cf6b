"""Groups given as index lists of different sizes (e.g. a block that straddles N:M groups)."""

import numpy as np
import pytest

from qsurgeon.client.errors import InvalidProblemError
from qsurgeon.worker import BlockProblem, solve


def test_ragged_index_lists_become_labels() -> None:
    Q = np.diag(np.arange(5, dtype=np.float32))
    problem = BlockProblem.dense(Q, groups=[[0, 1, 2], [3, 4]], counts=[1, 1])
    assert problem.group_of.tolist() == [0, 0, 0, 1, 1]
    answer = solve(problem, "exhaustive")
    assert answer.x.tolist() == [1, 0, 0, 1, 0]  # the cheapest variable of each group
    assert answer.energy == pytest.approx(0.0 + 3.0)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([[0, 1, 2], [2, 3, 4]], "overlap"),
        ([[0, 1], [3, 4, 1, 0]], "overlap"),
        ([[0, 1, 2], [3]], "miss"),
        ([[0, 1, 2], [3, 4, 9]], "lie in"),
        ([[0, 1, 2], [3.0, 4.0]], "integers"),
    ],
)
def test_bad_ragged_groups_are_refused(groups, message) -> None:
    with pytest.raises(InvalidProblemError, match=message):
        BlockProblem.dense(np.eye(5, dtype=np.float32), groups=groups, counts=[1, 1])
