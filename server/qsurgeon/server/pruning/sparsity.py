"""What "prune to density ρ" means for one weight tensor.

A mask is a bool tensor shaped like the weight with ``True`` meaning *pruned*
(docs/icbs.md §1: x_i = 1 is pruned). The density constraint has a granularity:

- ``tensor``: keep round(ρ·n) of the n weights of the tensor,
- ``row``: keep round(ρ·in) of every output row (Wanda's choice),
- ``column``: keep round(ρ·out) of every input column,
- N:M (``pattern=(N, M)``): keep N of every M consecutive input weights of a row
  (2:4 is the pattern GPUs accelerate); the density is then N/M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qsurgeon.client.errors import UsageError

Granularity = Literal["tensor", "row", "column"]
GRANULARITIES: tuple[str, ...] = ("tensor", "row", "column")


@dataclass(frozen=True)
class Sparsity:
    density: float  # fraction of weights kept
    granularity: Granularity = "row"
    pattern: tuple[int, int] | None = None  # (N, M): keep N of every M

    def __post_init__(self) -> None:
        if self.pattern is not None:
            n_keep, m = self.pattern
            if not (0 < n_keep < m):
                raise UsageError(f"pattern {n_keep}:{m} must keep between 1 and {m - 1} of every {m}")
        elif not 0.0 < self.density < 1.0:
            raise UsageError(f"density must lie strictly between 0 and 1, got {self.density}")
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")

    @classmethod
    def parse(cls, density: float | None, pattern: str | None = None, granularity: str = "row") -> "Sparsity":
        """Build from CLI/API values: ``pattern`` like "2:4" overrides ``density``."""
        if pattern:
            try:
                n_text, m_text = pattern.split(":")
                n_keep, m = int(n_text), int(m_text)
            except ValueError:
                raise UsageError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
            if density is not None and abs(density - n_keep / m) > 1e-9:
                raise UsageError(f"density {density} contradicts pattern {pattern} (density {n_keep / m:g})")
            return cls(density=n_keep / m, granularity="row", pattern=(n_keep, m))
        if density is None:
            raise UsageError("give a density (0 < density < 1) or a pattern N:M")
        return cls(density=float(density), granularity=granularity)  # type: ignore[arg-type]

    def check_shape(self, shape: tuple[int, int], name: str = "weight") -> None:
        """Raise UsageError if this constraint cannot apply to a tensor of ``shape`` (out, in)."""
        if self.pattern is not None and shape[1] % self.pattern[1]:
            raise UsageError(
                f"pattern {self.pattern[0]}:{self.pattern[1]} needs the input width of {name} "
                f"({shape[1]}) to be a multiple of {self.pattern[1]}"
            )

    def pruned_per_group(self, group_size: int) -> int:
        """How many of ``group_size`` weights are pruned: the group keeps round(ρ·size)."""
        if self.pattern is not None:
            return self.pattern[1] - self.pattern[0]
        return group_size - int(round(self.density * group_size))

    def describe(self) -> str:
        if self.pattern is not None:
            return f"{self.pattern[0]}:{self.pattern[1]}"
        return f"density {self.density:g} per {self.granularity}"
