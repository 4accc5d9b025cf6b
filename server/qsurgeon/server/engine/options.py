"""The engine's side of the prune options: the views and checks that need engine code.

The options themselves are declared once, in :mod:`qsurgeon.client.options`. Here:

- :class:`ICBSConfig`, the iCBS loop's settings, a model whose fields are *taken* from
  :class:`PruneOptions` (same types, bounds and checks), plus the loop's own round size;
- :func:`sparsity_of`, the density constraint the options describe;
- :func:`check_engine_options`, what only the engine knows: which solvers are installed
  and which parameters each declares. The service runs it before it accepts a job.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, create_model

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import PruneOptions, UsageChecked
from qsurgeon.server.pruning.sparsity import Sparsity

#: the PruneOptions fields the iCBS loop reads
ICBS_FIELDS: tuple[str, ...] = (
    "block_size", "k", "epochs", "steps_per_epoch", "coverage", "selection", "tabu_size", "fixed_pruned",
    "fixed_kept", "objective", "fisher_weight", "gamma", "ridge", "solver", "solver_params", "seed",
    "reference", "merge", "route",
)
#: Solver parameters iCBS uses when ``solver_params`` leaves them out (benchmarks/icbs_layer.py):
#: thousands of small blocks per round, each started from the current mask, want short runs.
ICBS_SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sa": {"sweeps": 32, "restarts": 2, "start": "x0"},
    # 50 best-swap steps from the current mask: a lower layer error than sa 2 × 32 in about
    # the same solve time on B = 128 blocks (docs/solvers.md); its own default (2 × 3000)
    # is tuned for one large block, far too long for thousands of iCBS blocks
    "swap-tabu": {"iterations": 50, "restarts": 1, "start": "x0"},
    # auto's iCBS-sized budgets are the two entries above (docs/solvers.md, "auto")
    "auto": {"effort": "short", "start": "x0"},
}


class _ICBSSettings(UsageChecked):
    """Methods of :class:`ICBSConfig`; invalid values raise UsageError like every option."""

    def block_k(self, block: int) -> int:
        """Pruned weights in a block of ``block`` weights: k, or half, clipped to what exists."""
        k = self.k  # type: ignore[attr-defined]
        return max(1, min(block - 1, k if k is not None else block // 2))

    def params(self) -> dict[str, Any]:
        """The solver's parameters for iCBS blocks: iCBS's defaults under the user's."""
        return {**ICBS_SOLVER_DEFAULTS.get(self.solver, {}), **self.solver_params}  # type: ignore[attr-defined]

    def solver_request(self, seed: int) -> tuple[str, dict[str, Any]]:
        """The solver name and parameters of a round: the solver itself, or, with ``reference`` or
        ``route``, the ``shadow`` composite wrapping it (docs/quantum.md); the reference gets
        iCBS's defaults for it, like the solver does."""
        if self.reference is None and self.route is None:  # type: ignore[attr-defined]
            return self.solver, {**self.params(), "seed": seed}  # type: ignore[attr-defined]
        from qsurgeon.worker.solvers.shadow import DEFAULT_CLASSICAL, shadow_params

        classical = self.reference or DEFAULT_CLASSICAL  # type: ignore[attr-defined]
        return "shadow", shadow_params(self.solver, self.params(), reference=self.reference,  # type: ignore[attr-defined]
                                       merge=self.merge, route=self.route,  # type: ignore[attr-defined]
                                       reference_params=ICBS_SOLVER_DEFAULTS.get(classical, {}), seed=seed)


#: How the iCBS loop searches: the PruneOptions fields of :data:`ICBS_FIELDS`, declared there,
#: plus ``round_blocks`` (the most blocks in one round; None: bounded by memory).
ICBSConfig = create_model(
    "ICBSConfig",
    __base__=_ICBSSettings,
    **{name: (PruneOptions.model_fields[name].annotation, PruneOptions.model_fields[name]) for name in ICBS_FIELDS},
    round_blocks=(int | None, Field(None, ge=1, description="most blocks in one round (None: bounded by memory)")),
)


def icbs_config(options: PruneOptions, **overrides: Any) -> Any:
    """The iCBS settings of ``options``."""
    return ICBSConfig(**{name: getattr(options, name) for name in ICBS_FIELDS}, **overrides)


def sparsity_of(options: PruneOptions) -> Sparsity:
    """The density constraint: the N:M pattern, or the density (default 0.5) at the granularity."""
    if options.pattern:
        return Sparsity.parse(options.density, options.pattern)
    return Sparsity.parse(options.effective_density, None, options.granularity)


def check_engine_options(options: PruneOptions) -> None:
    """Raise UsageError if the solver is not installed or its parameters are not its declared ones."""
    if options.method != "icbs":
        return
    if options.search_on == "refit" and options.objective != "layerwise":
        raise UsageError("--search-on refit needs --objective layerwise")
    from qsurgeon.worker.solvers.registry import check_solver_params

    check_solver_params(*icbs_config(options).solver_request(options.seed))


__all__ = ["ICBSConfig", "ICBS_FIELDS", "ICBS_SOLVER_DEFAULTS", "check_engine_options", "icbs_config", "sparsity_of"]
