"""Seeded block problems of the pruning kind and an independent brute force, shared by the solver tests."""

from __future__ import annotations

import functools
import itertools

import numpy as np

from qsurgeon.worker.block.problem import BlockProblem


def pruning_block(size: int, seed: int, *, k: int | None = None, groups=None, counts=None,
                  with_x0: bool = False) -> BlockProblem:
    """Q = diag(w) X Xᵀ diag(w) with heavy-tailed weights and correlated inputs, as in pruning."""
    rng = np.random.default_rng(seed)
    tokens = 3 * size
    latent = rng.standard_normal((size, 4))
    X = latent @ rng.standard_normal((4, tokens)) + 0.5 * rng.standard_normal((size, tokens))
    w = rng.standard_t(3, size) * 0.05
    Q = (w[:, None] * (X @ X.T / tokens) * w[None, :]).astype(np.float32)
    if k is None and groups is None:
        k = int(rng.integers(1, size))
    x0 = None
    if with_x0:
        x0 = np.zeros(size, np.uint8)
        if groups is None:
            x0[np.argsort(np.abs(w))[:k]] = 1  # magnitude pruning: a plausible current mask
        else:
            for group, count in enumerate(counts):
                members = np.nonzero(np.asarray(groups) == group)[0]
                x0[members[np.argsort(np.abs(w[members]))[:count]]] = 1
    return BlockProblem.dense(Q, k=k, groups=groups, counts=counts, x0=x0, offset=float(rng.normal()) * 1e-3)


def factored_block(size: int, rank: int, seed: int, **constraint) -> BlockProblem:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((rank, size)) * rng.standard_t(3, size) * 0.05
    c = rng.normal(0, 1e-3, size)
    return BlockProblem.factored(F, c, offset=0.01, **constraint)


def direct_energy(problem: BlockProblem, x: np.ndarray) -> float:
    Q = problem.dense_Q()
    x = x.astype(np.float64)
    return float(x @ Q @ x) + problem.offset


@functools.lru_cache(maxsize=None)
def _all_assignments(size: int, k: int) -> np.ndarray:
    rows = list(itertools.combinations(range(size), k))
    X = np.zeros((len(rows), size))
    X[np.repeat(np.arange(len(rows)), k), np.array(rows, dtype=np.int64).reshape(-1)] = 1.0
    return X


def enumerated_minimum(problem: BlockProblem) -> float:
    """min xᵀQx + offset over every x with each group's count of ones, by itertools (only the
    feasible states: 13,824 for six groups of 4 where all 2^24 would take seconds)."""
    if problem.num_groups == 1:
        X = _all_assignments(problem.num_variables, problem.k)
    else:
        choices = [list(itertools.combinations(members, int(count)))
                   for members, count in zip(problem.group_members(), problem.counts)]
        X = np.zeros((int(np.prod([len(options) for options in choices])), problem.num_variables))
        for row, picks in enumerate(itertools.product(*choices)):
            for chosen in picks:
                X[row, list(chosen)] = 1.0
    return float(np.einsum("nb,nb->n", X @ problem.dense_Q(), X).min()) + problem.offset
