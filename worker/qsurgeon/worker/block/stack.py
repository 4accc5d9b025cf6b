"""Stacked block matrices: one float32 buffer that many dense problems view, read without a copy.

A round of iCBS holds thousands of dense B × B blocks, a few hundred MB in all. The ``sa``
kernels want every Q back to back in one flat float32 array; copying a round's matrices
into fresh memory costs more than annealing them. So the two sides agree on a contract:

- the builder asks a :class:`MatrixStack` for (n, B, B) views and writes the blocks into
  them, in the order the problems will be handed to the solver;
- the solver calls :func:`flat_matrices`, which returns the stack's own memory when the
  problems' Q are C-contiguous float32 views of one buffer that follow each other exactly,
  and a concatenated copy otherwise. The answer is the same either way; only the copy is saved.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qsurgeon.worker.block.problem import BlockProblem

__all__ = ["MatrixStack", "flat_matrices"]


class MatrixStack:
    """A fixed float32 buffer that hands out consecutive (blocks, size, size) views.

    Views are handed out in order and never overlap, so problems built on them in the
    same order are back to back in memory and :func:`flat_matrices` reads them in place.
    The capacity is fixed up front (the most the caller can ask for) because growing the
    buffer would move it and break the views already handed out.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be non-negative, got {capacity}")
        self._flat = np.empty(capacity, np.float32)
        self._used = 0

    @property
    def capacity(self) -> int:
        """Float32 entries the stack holds."""
        return self._flat.shape[0]

    @property
    def used(self) -> int:
        """Float32 entries already handed out."""
        return self._used

    def take(self, blocks: int, size: int) -> np.ndarray:
        """The next ``blocks`` × ``size`` × ``size`` entries as a writable view (uninitialised)."""
        count = blocks * size * size
        if self._used + count > self.capacity:
            raise ValueError(f"stack of {self.capacity} entries cannot hold {blocks} more {size}×{size} blocks "
                             f"({self._used} already taken)")
        view = self._flat[self._used:self._used + count].reshape(blocks, size, size)
        self._used += count
        return view


def flat_matrices(problems: Sequence[BlockProblem]) -> np.ndarray:
    """Every dense problem's Q back to back, flat float32, without a copy when they already are.

    In place when each Q is a C-contiguous float32 view of the same buffer (a
    :class:`MatrixStack`'s, or any stacked (n, B, B) array's) and each starts where the
    previous one ends; the result is then read-only so a solver cannot write into the
    caller's blocks. Anything else is concatenated into a new array with the same values.
    """
    first = problems[0].Q
    base = first.base
    expected = first.__array_interface__["data"][0]
    stacked = base is not None
    for problem in problems:
        Q = problem.Q
        if not (stacked and Q.base is base and Q.dtype == np.float32 and Q.flags.c_contiguous
                and Q.__array_interface__["data"][0] == expected):
            stacked = False
            break
        expected += Q.nbytes
    if stacked:
        total = sum(problem.Q.size for problem in problems)
        return np.lib.stride_tricks.as_strided(first, shape=(total,), strides=(4,), writeable=False)
    return np.concatenate([np.asarray(p.Q, np.float32).reshape(-1) for p in problems])
