"""The block problem format: what every solver receives and what it returns.

A block of iCBS is a cardinality-constrained QUBO

    minimise  E(x) = xᵀ Q x + offset   over x ∈ {0,1}^B
    subject to     Σ_{i ∈ group g} x_i = counts[g]   for every group g.

A plain "k ones in total" constraint is one group that holds every variable; N:M
sparsity is one group per M consecutive weights with count M−N. Every variable belongs
to exactly one group, so a swap inside a group (one 1 ↔ one 0) keeps the problem
feasible, which is what the annealer relies on.

Q is given densely (B×B, float32, symmetric) or factored as ``Q = FᵀF + diag(c)``
(F r×B): Fisher blocks have r ≪ B and must never be expanded to B×B by the annealer.
Energies are always evaluated in float64 because block energies are tiny (1e-4…1e-2).

Both classes serialise to a compact, versioned binary form (:mod:`qsurgeon.worker.block.codec`)
that round-trips bit-exactly and is what the queue carries; the user-facing file form is ``.npz``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qsurgeon.client.errors import InfeasibleSolutionError, InvalidProblemError

#: Largest block any problem may have; solvers have their own, smaller limits.
MAX_VARIABLES = 1 << 16
#: Largest rank of a factored problem.
MAX_RANK = 1 << 16



def _as_float32(name: str, value: Any, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise InvalidProblemError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != ndim:
        raise InvalidProblemError(f"{name} must be {ndim}-dimensional, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidProblemError(f"{name} contains NaN or infinite values")
    return array


def _groups_to_labels(groups: Any, num_variables: int) -> np.ndarray:
    """Accept groups as a label per variable (length B) or as rows of indices (G×m)."""
    try:
        array = np.asarray(groups)
    except ValueError:  # ragged rows: groups of different sizes given as index lists
        rows = [np.asarray(row) for row in groups]
        if any(row.ndim != 1 or row.dtype.kind not in "iu" for row in rows):
            raise InvalidProblemError("groups given as index lists must be lists of integers") from None
        array = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        sizes = [len(row) for row in rows]
        return _labels_from_index_lists(array, np.repeat(np.arange(len(rows)), sizes), num_variables)
    if array.dtype.kind not in "iu":
        raise InvalidProblemError(f"groups must be integers, got dtype {array.dtype}")
    if array.ndim == 1:
        if array.shape[0] != num_variables:
            raise InvalidProblemError(
                f"groups as labels must have one entry per variable ({num_variables}), got {array.shape[0]}"
            )
        labels = array.astype(np.int32)
        if labels.min(initial=0) < 0:
            raise InvalidProblemError("group labels must be non-negative")
        return labels
    if array.ndim != 2:
        raise InvalidProblemError(f"groups must be 1-D labels or 2-D index rows, got shape {array.shape}")
    group_index = np.repeat(np.arange(array.shape[0]), array.shape[1])
    return _labels_from_index_lists(array.reshape(-1), group_index, num_variables)


def _labels_from_index_lists(flat: np.ndarray, group_index: np.ndarray, num_variables: int) -> np.ndarray:
    """Labels from (variable index, its group) pairs, refusing overlaps and missed variables."""
    if flat.size and (flat.min() < 0 or flat.max() >= num_variables):
        raise InvalidProblemError(f"group indices must lie in 0..{num_variables - 1}")
    seen = np.bincount(flat, minlength=num_variables) if flat.size else np.zeros(num_variables, np.int64)
    if (seen > 1).any():
        raise InvalidProblemError(f"groups overlap: variable {int(np.argmax(seen > 1))} is in more than one group")
    if (seen == 0).any():
        raise InvalidProblemError(f"groups miss variables: variable {int(np.argmax(seen == 0))} is in no group")
    labels = np.empty(num_variables, dtype=np.int32)
    labels[flat] = group_index
    return labels


@dataclass(frozen=True, eq=False)
class BlockProblem:
    """One cardinality-constrained QUBO block. Build with :meth:`dense` or :meth:`factored`."""

    group_of: np.ndarray  # (B,) int32: the group of each variable, labels 0..G-1
    counts: np.ndarray  # (G,) int32: how many ones each group must hold
    Q: np.ndarray | None = None  # (B, B) float32, symmetric
    F: np.ndarray | None = None  # (r, B) float32
    c: np.ndarray | None = None  # (B,) float32, the diagonal added to FᵀF
    offset: float = 0.0
    x0: np.ndarray | None = None  # (B,) uint8, a feasible current assignment
    id: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def dense(
        cls,
        Q: Any,
        *,
        k: int | None = None,
        groups: Any = None,
        counts: Any = None,
        offset: float = 0.0,
        x0: Any = None,
        id: str = "",
        meta: Mapping[str, Any] | None = None,
        symmetry_tolerance: float = 1e-6,
        validate: bool = True,
    ) -> "BlockProblem":
        """A problem with an explicit B×B matrix (symmetrised after a tolerance check).

        ``validate=False`` skips the O(B²) symmetry and finiteness checks and the x0 check;
        it is for builders that produce exactly symmetric, finite float32 matrices by
        construction and build thousands of blocks per round. Never use it on user input.
        """
        if not validate:
            group_of, counts_array = _constraint(len(Q), k, groups, counts)
            return cls(
                group_of=group_of, counts=counts_array, Q=Q, offset=float(offset),
                x0=None if x0 is None else np.ascontiguousarray(x0, dtype=np.uint8),
                id=str(id), meta=dict(meta or {}),
            )
        Q = _as_float32("Q", Q, 2)
        if Q.shape[0] != Q.shape[1]:
            raise InvalidProblemError(f"Q must be square, got shape {Q.shape}")
        scale = float(np.abs(Q).max(initial=0.0))
        asymmetry = float(np.abs(Q - Q.T).max(initial=0.0))
        if asymmetry > symmetry_tolerance * max(scale, 1e-30):
            raise InvalidProblemError(
                f"Q must be symmetric: max |Q - Qᵀ| = {asymmetry:.3g} (max |Q| = {scale:.3g})"
            )
        if asymmetry:
            Q = np.ascontiguousarray((Q + Q.T) * np.float32(0.5))
        group_of, counts_array = _constraint(Q.shape[0], k, groups, counts)
        return cls._checked(group_of, counts_array, Q=Q, offset=offset, x0=x0, id=id, meta=meta)

    @classmethod
    def factored(
        cls,
        F: Any,
        c: Any = None,
        *,
        k: int | None = None,
        groups: Any = None,
        counts: Any = None,
        offset: float = 0.0,
        x0: Any = None,
        id: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> "BlockProblem":
        """A problem with ``Q = FᵀF + diag(c)``; F is r×B."""
        F = _as_float32("F", F, 2)
        num_variables = F.shape[1]
        if F.shape[0] > MAX_RANK:
            raise InvalidProblemError(f"F has rank {F.shape[0]}, more than the limit {MAX_RANK}")
        c = np.zeros(num_variables, np.float32) if c is None else _as_float32("c", c, 1)
        if c.shape[0] != num_variables:
            raise InvalidProblemError(f"c must have {num_variables} entries (columns of F), got {c.shape[0]}")
        group_of, counts_array = _constraint(num_variables, k, groups, counts)
        return cls._checked(group_of, counts_array, F=F, c=c, offset=offset, x0=x0, id=id, meta=meta)

    @classmethod
    def _checked(cls, group_of, counts, *, x0, offset, id, meta, **matrices) -> "BlockProblem":
        if not np.isfinite(offset):
            raise InvalidProblemError("offset must be finite")
        problem = cls(
            group_of=group_of,
            counts=counts,
            offset=float(offset),
            x0=None if x0 is None else _as_assignment("x0", x0, group_of.shape[0]),
            id=str(id),
            meta=dict(meta or {}),
            **matrices,
        )
        if problem.x0 is not None and not problem.is_feasible(problem.x0):
            raise InvalidProblemError("x0 does not satisfy the constraint (wrong number of ones in a group)")
        return problem

    # ------------------------------------------------------------------ properties
    @property
    def num_variables(self) -> int:
        return int(self.group_of.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.counts.shape[0])

    @property
    def is_factored(self) -> bool:
        return self.F is not None

    @property
    def rank(self) -> int | None:
        return None if self.F is None else int(self.F.shape[0])

    @property
    def k(self) -> int:
        """Total number of ones in every feasible assignment."""
        return int(self.counts.sum())

    def group_members(self) -> list[np.ndarray]:
        """Indices of the variables of each group, in group order."""
        order = np.argsort(self.group_of, kind="stable")
        bounds = np.cumsum(np.bincount(self.group_of, minlength=self.num_groups))[:-1]
        return np.split(order, bounds)

    def dense_Q(self) -> np.ndarray:
        """Q as a B×B float64 matrix (forms FᵀF for factored problems: small B only)."""
        if self.Q is not None:
            return self.Q.astype(np.float64)
        F = self.F.astype(np.float64)
        return F.T @ F + np.diag(self.c.astype(np.float64))

    # ------------------------------------------------------------------ evaluation
    def energy(self, x: Any) -> float:
        """E(x) = xᵀQx + offset in float64, without forming Q for factored problems.

        For a 0/1 vector only the rows and columns of its ones matter, so this sums the
        k×k submatrix (or the k columns of F) in float64 instead of converting all of Q:
        the engine checks thousands of answers per round.
        """
        ones = np.flatnonzero(np.asarray(x))
        if self.Q is not None:
            quadratic = float(self.Q.take(ones, 0).take(ones, 1).sum(dtype=np.float64))
        else:
            projected = self.F[:, ones].sum(axis=1, dtype=np.float64)
            quadratic = float(projected @ projected) + float(self.c[ones].sum(dtype=np.float64))
        return quadratic + self.offset

    def energies(self, X: np.ndarray) -> np.ndarray:
        """Energies of many assignments at once: X is n×B of 0/1, result n float64."""
        X = np.asarray(X, dtype=np.float64)
        if self.Q is not None:
            quadratic = np.einsum("nb,nb->n", X @ self.Q.astype(np.float64), X)
        else:
            projected = X @ self.F.astype(np.float64).T
            quadratic = np.einsum("nr,nr->n", projected, projected) + X @ self.c.astype(np.float64)
        return quadratic + self.offset

    def group_sums(self, x: np.ndarray) -> np.ndarray:
        return np.bincount(self.group_of, weights=np.asarray(x, dtype=np.float64), minlength=self.num_groups)

    def is_feasible(self, x: Any) -> bool:
        x = np.asarray(x)
        if x.shape != (self.num_variables,) or not _is_binary(x):
            return False
        return bool(np.array_equal(self.group_sums(x), self.counts))

    def check_feasible(self, x: Any, solver: str = "solver") -> np.ndarray:
        """Return x as uint8 if it is feasible, else raise InfeasibleSolutionError saying why."""
        x = np.asarray(x)
        if x.shape != (self.num_variables,):
            raise InfeasibleSolutionError(
                f"{solver} returned {x.shape} values for a problem of {self.num_variables} variables"
            )
        if not _is_binary(x):
            raise InfeasibleSolutionError(f"{solver} returned values other than 0 and 1")
        sums = self.group_sums(x)
        wrong = np.nonzero(sums != self.counts)[0]
        if wrong.size:
            group = int(wrong[0])
            raise InfeasibleSolutionError(
                f"{solver} returned an infeasible answer: group {group} has {int(sums[group])} ones, "
                f"needs {int(self.counts[group])} ({wrong.size} group(s) wrong)"
            )
        return x.astype(np.uint8)

    def with_x0(self, x0: Any) -> "BlockProblem":
        return BlockProblem._checked(
            self.group_of, self.counts, Q=self.Q, F=self.F, c=self.c,
            offset=self.offset, x0=x0, id=self.id, meta=self.meta,
        )

    def save_npz(self, path: str | Path) -> None:
        """Write the user file form: Q (or F, c), k (or groups, counts), x0, offset."""
        arrays: dict[str, np.ndarray] = {"offset": np.float64(self.offset)}
        if self.Q is not None:
            arrays["Q"] = self.Q
        else:
            arrays["F"], arrays["c"] = self.F, self.c
        if self.num_groups == 1:
            arrays["k"] = np.int64(self.counts[0])
        else:
            arrays["groups"], arrays["counts"] = self.group_of, self.counts
        if self.x0 is not None:
            arrays["x0"] = self.x0
        if self.id:
            arrays["id"] = np.array(self.id)
        if self.meta:
            arrays["meta"] = np.array(json.dumps(dict(self.meta)))
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> "BlockProblem":
        """Read the user file form; refuses pickled objects."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise InvalidProblemError(f"{path}: not a readable .npz file ({error})") from None
        unknown = set(arrays) - {"Q", "F", "c", "k", "groups", "counts", "x0", "offset", "id", "meta"}
        if unknown:
            raise InvalidProblemError(f"{path}: unknown arrays {sorted(unknown)}")
        if "k" in arrays and ("groups" in arrays or "counts" in arrays):
            raise InvalidProblemError(f"{path}: give either k or groups and counts, not both")
        constraint: dict[str, Any] = {}
        if "k" in arrays:
            constraint["k"] = _scalar_int(arrays["k"], "k")
        else:
            constraint["groups"] = arrays.get("groups")
            constraint["counts"] = arrays.get("counts")
        offset = float(arrays["offset"]) if "offset" in arrays else 0.0
        common: dict[str, Any] = dict(offset=offset, x0=arrays.get("x0"), **constraint)
        if "id" in arrays:
            common["id"] = str(arrays["id"])
        if "meta" in arrays:
            try:
                common["meta"] = json.loads(str(arrays["meta"]))
            except json.JSONDecodeError:
                raise InvalidProblemError(f"{path}: meta is not JSON") from None
        try:
            if "Q" in arrays:
                if "F" in arrays or "c" in arrays:
                    raise InvalidProblemError("give either Q or F (with optional c), not both")
                return cls.dense(arrays["Q"], **common)
            if "F" in arrays:
                if "c" not in arrays:  # a file that lost its diagonal would solve a different problem
                    raise InvalidProblemError("a factored problem needs c beside F (Q = FᵀF + diag(c); "
                                              "write zeros if it has no diagonal part)")
                return cls.factored(arrays["F"], arrays["c"], **common)
            raise InvalidProblemError("the file holds neither Q nor F")
        except InvalidProblemError as error:
            raise InvalidProblemError(f"{path}: {error}") from None


def _is_binary(x: np.ndarray) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _scalar_int(value: np.ndarray, name: str) -> int:
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise InvalidProblemError(f"{name} must be a single integer")
    return int(value)


def _check_counts(group_of: np.ndarray, counts: np.ndarray) -> None:
    sizes = np.bincount(group_of, minlength=counts.shape[0])
    if sizes.shape[0] != counts.shape[0]:
        raise InvalidProblemError(
            f"group labels go up to {sizes.shape[0] - 1} but counts has {counts.shape[0]} entries"
        )
    if (sizes == 0).any():
        raise InvalidProblemError(f"group {int(np.argmax(sizes == 0))} has no variables")
    bad = np.nonzero((counts < 0) | (counts > sizes))[0]
    if bad.size:
        group = int(bad[0])
        raise InvalidProblemError(
            f"group {group} must hold {int(counts[group])} ones but has {int(sizes[group])} variables"
        )


def _constraint(num_variables: int, k: Any, groups: Any, counts: Any) -> tuple[np.ndarray, np.ndarray]:
    if num_variables == 0:
        raise InvalidProblemError("a problem needs at least one variable")
    if num_variables > MAX_VARIABLES:
        raise InvalidProblemError(f"problem has {num_variables} variables, more than the limit {MAX_VARIABLES}")
    if k is not None:
        if groups is not None or counts is not None:
            raise InvalidProblemError("give either k or groups and counts, not both")
        if isinstance(k, bool) or int(k) != k:
            raise InvalidProblemError(f"k must be an integer, got {k!r}")
        if not 0 <= int(k) <= num_variables:
            raise InvalidProblemError(f"k must lie in 0..{num_variables}, got {int(k)}")
        return np.zeros(num_variables, np.int32), np.array([int(k)], np.int32)
    if groups is None or counts is None:
        raise InvalidProblemError("a constraint is required: k, or groups with counts")
    group_of = _groups_to_labels(groups, num_variables)
    counts_array = np.asarray(counts)
    if counts_array.dtype.kind not in "iu" or counts_array.ndim != 1:
        raise InvalidProblemError("counts must be a 1-D integer array")
    counts_array = counts_array.astype(np.int32)
    _check_counts(group_of, counts_array)
    return np.ascontiguousarray(group_of), np.ascontiguousarray(counts_array)


def _as_assignment(name: str, value: Any, num_variables: int) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != (num_variables,):
        raise InvalidProblemError(f"{name} must have {num_variables} entries, got shape {array.shape}")
    if not _is_binary(array):
        raise InvalidProblemError(f"{name} must hold only 0 and 1")
    return np.ascontiguousarray(array, dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class BlockSolution:
    """A solver's answer to one block, checked and with its energy recomputed in float64."""

    x: np.ndarray  # (B,) uint8
    energy: float  # xᵀQx + offset, float64
    solver: str
    seconds: float = 0.0
    sweeps: int = 0
    restarts: int = 0
    problem_id: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (x as a list of 0/1) for the CLI and the REST API."""
        return {
            "energy": self.energy, "x": self.x.astype(int).tolist(), "solver": self.solver,
            "seconds": self.seconds, "sweeps": self.sweeps, "restarts": self.restarts,
            "problem_id": self.problem_id, "metadata": dict(self.metadata),
        }

    def save_npz(self, path: str | Path) -> None:
        with open(path, "wb") as handle:
            np.savez(
                handle, x=self.x, energy=np.float64(self.energy), solver=np.array(self.solver),
                seconds=np.float64(self.seconds), sweeps=np.int64(self.sweeps), restarts=np.int64(self.restarts),
                metadata=np.array(json.dumps(dict(self.metadata))),
            )
