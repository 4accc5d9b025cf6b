"""Counter-based random numbers shared by the CPU and CUDA annealing kernels.

Every random number a chain uses is ``splitmix64_mix(key + counter · γ)``: a pure function
of the chain's key and a counter, with no sequential state. That is what makes the
reproducibility contract cheap to keep: a chain's key comes from (seed, restart, problem
content), never from its position in a batch, and the numba kernel, which draws lazily,
and the torch kernel, which draws for every chain at every step, read the very same
numbers. The proposal of step ``t`` reads counters ``3t`` (the two slots), ``3t + 1``
(the Metropolis uniform) and ``3t + 2`` (the group, when there are several).

This module holds the pure-Python/numpy reference of those conventions (used for key
derivation and by the tests); the kernels re-implement the same arithmetic.
"""

from __future__ import annotations

import hashlib

import numpy as np

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

#: Number of random swaps whose median |ΔE| sets a chain's energy scale.
SCALE_SAMPLES = 256
#: Metropolis moves with β·ΔE above this are rejected without drawing: e^-40 < 2^-53.
MAX_BETA_DELTA = 40.0


def mix64(value: int) -> int:
    """The splitmix64 finaliser on Python ints (reference for the kernels)."""
    z = value & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def draw(key: int, counter: int) -> int:
    return mix64((key + counter * GAMMA) & MASK64)


def chain_keys(problem_digest: bytes, seed: int, restarts: int) -> np.ndarray:
    """(restarts, 3) uint64 keys (start state, energy scale, annealing run) of each chain.

    Derived from the problem's content digest, the seed and the restart index only, so a
    problem gets the same chains whichever batch or position it is solved in.
    """
    keys = np.empty((restarts, 3), np.uint64)
    seed_bytes = int(seed).to_bytes(16, "little", signed=True)
    for restart in range(restarts):
        digest = hashlib.blake2b(
            problem_digest + seed_bytes + restart.to_bytes(8, "little"), digest_size=24, person=b"qsurgeon-sa"
        ).digest()
        keys[restart] = np.frombuffer(digest, dtype="<u8")
    return keys


def problem_digest(group_of: np.ndarray, counts: np.ndarray, x0: np.ndarray | None, *matrices: np.ndarray) -> bytes:
    """A cheap content fingerprint: shapes, constraint, x0 and a few O(B) views of Q.

    Hashing all of a 256×256 Q for thousands of blocks per round would cost more than the
    annealing of a short run; the diagonal (or c and the column sums of F) plus the first
    row already tells apart any two blocks that differ in practice.
    """
    hasher = hashlib.blake2b(digest_size=16, person=b"qsurgeon-prob")
    hasher.update(np.ascontiguousarray(group_of, dtype="<i4").tobytes())
    hasher.update(np.ascontiguousarray(counts, dtype="<i4").tobytes())
    hasher.update(b"-" if x0 is None else np.ascontiguousarray(x0, dtype=np.uint8).tobytes())
    for matrix in matrices:
        hasher.update(repr(matrix.shape).encode())
        hasher.update(np.ascontiguousarray(matrix, dtype="<f4").tobytes())
    return hasher.digest()
