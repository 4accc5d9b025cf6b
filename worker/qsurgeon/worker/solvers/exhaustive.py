"""Exact solver: vectorised enumeration of every feasible assignment (B ≤ 24).

Used as the ground truth in tests and benchmarks. It walks all 2^B bit patterns in
chunks, keeps those with the right count in every group, and evaluates their energies
as one matrix product per chunk.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import SEED, Capabilities, Solver

MAX_EXHAUSTIVE_VARIABLES = 24
_CHUNK_BITS = 18


class ExhaustiveSolver(Solver):
    capabilities = Capabilities(
        name="exhaustive",
        description="exact enumeration of all feasible assignments",
        max_variables=MAX_EXHAUSTIVE_VARIABLES,
        constraints="native",
        device="cpu",
        exact=True,
    )
    #: Enumeration needs no setting; the seed the engine hands every solver is accepted and unused.
    parameters = (SEED,)

    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        started = time.perf_counter()
        num_variables = problem.num_variables
        Q = problem.dense_Q()
        bit_values = np.arange(num_variables, dtype=np.int64)
        # one-hot group membership, to count ones per group with a matrix product
        membership = np.zeros((num_variables, problem.num_groups), np.int64)
        membership[bit_values, problem.group_of] = 1
        best_energy = np.inf
        best_x: np.ndarray | None = None
        feasible = 0
        chunk = 1 << min(_CHUNK_BITS, num_variables)
        for start in range(0, 1 << num_variables, chunk):
            patterns = np.arange(start, start + chunk, dtype=np.int64)
            bits = ((patterns[:, None] >> bit_values) & 1).astype(np.int64)
            keep = (bits @ membership == problem.counts).all(axis=1)
            candidates = bits[keep].astype(np.float64)
            if not len(candidates):
                continue
            feasible += len(candidates)
            energies = np.einsum("nb,nb->n", candidates @ Q, candidates)
            index = int(np.argmin(energies))
            if energies[index] < best_energy:
                best_energy = float(energies[index])
                best_x = candidates[index].astype(np.uint8)
        assert best_x is not None  # the constraint check guarantees a feasible assignment exists
        return BlockSolution(
            x=best_x,
            energy=best_energy + problem.offset,
            solver=self.name,
            seconds=time.perf_counter() - started,
            problem_id=problem.id,
            metadata={"feasible_assignments": feasible},
        )
