"""What a prune run reports: seconds per phase, the error of every tensor, the summary (``report.json``).

Errors are relative to the dense layer's output energy ‖W0 A‖² (docs/icbs.md §5), so
tensors of different sizes add up and compare; the summary weights each tensor by that
energy, which makes it the relative error of all pruned layers together.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Iterator, Mapping

import torch

from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.outputs import report_json
from qsurgeon.server.models.calibration import CalibrationData
from qsurgeon.server.pruning.sparsity import Sparsity

#: report phases, in order; each gets its seconds in ``report["seconds"]``. ``report`` is the
#: per-tensor error report below: on a 1.24 B GPU run it was ~40 % of the wall time before it
#: had a phase of its own (docs/scale.md), so it is timed like the rest
PHASES: tuple[str, ...] = ("load", "calibrate", "init", "icbs", "refit", "report", "save")


class PhaseTimer:
    """``with PhaseTimer(timings, "icbs"):`` adds the block's wall seconds to ``timings["icbs"]``.

    Phases recur (every transformer block calibrates and searches), so time accumulates.
    """

    def __init__(self, timings: dict[str, float], phase: str):
        self.timings, self.phase = timings, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_: Any) -> None:
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + time.perf_counter() - self.start


def _relative(error: float, reference: float) -> float:
    return error / reference if reference > 0 else 0.0


def _quadratic_forms(rows: Iterable[torch.Tensor], gram: torch.Tensor, device: torch.device | None) -> list[float]:
    """``Σ (D G) ∘ D`` for every ``D`` in ``rows`` (made one at a time): the products in float32 on ``device``, the sums in float64.

    These ``out × in²`` products are the report's whole cost (four per tensor with a refit),
    so they run where the block runs and in float32, about twice the float64 rate on a CPU
    and far more on a GPU. The rounding stays far below the digits reported: on a Gram with
    outlier features and strongly correlated inputs, even a refit's residual (an error
    4·10⁻⁵ of the dense output, where the cancellation is worst) agreed with float64 to
    6·10⁻⁷ relative; tests/test_scale.py checks 1e-4 on every entry.
    """
    device = device or gram.device
    gram32 = gram.to(device=device, dtype=torch.float32)
    values = []
    for matrix in rows:
        matrix = matrix.to(device=device, dtype=torch.float32)
        values.append(float(((matrix @ gram32).to(torch.float64) * matrix.to(torch.float64)).sum()))
    return values


def tensor_report(weight0: torch.Tensor, gram: torch.Tensor, initial: torch.Tensor, final: torch.Tensor,
                  weight: torch.Tensor | None, device: torch.device | None = None) -> dict[str, Any]:
    """One tensor's entry: density and the relative error of the initial mask, the final mask and the refit.

    ``device``: where the products run (the block's device; default the Gram's). An initial
    mask equal to the final one (every method but iCBS) is not computed twice.
    """
    w0 = weight0.detach().to(device or gram.device, torch.float32)
    initial, final = initial.to(w0.device), final.to(w0.device)
    same = initial is final or torch.equal(initial, final)

    def rows() -> Iterator[torch.Tensor]:  # one out × in matrix alive at a time, not four
        yield w0
        yield w0 * initial
        if not same:
            yield w0 * final
        if weight is not None:
            yield w0 - weight.detach().to(w0.device, torch.float32)

    forms = _quadratic_forms(rows(), gram, device)
    reference, error_initial = forms[0], forms[1]
    error_final = error_initial if same else forms[2]
    entry = {
        "shape": list(weight0.shape),
        "density": 1.0 - float(final.float().mean()),
        "error_initial": _relative(error_initial, reference),
        "error_final": _relative(error_final, reference),
        "error_dense_norm": reference,
    }
    if weight is not None:
        entry["error_weights"] = _relative(forms[-1], reference)
    return entry


def report_text(report: Mapping[str, Any]) -> str:
    """``report.json``'s contents."""
    return report_json(report) + "\n"


def prune_report(options: PruneOptions, sparsity: Sparsity, calibration: CalibrationData,
                 tensors: dict[str, dict[str, Any]], blocks: list[dict[str, Any]], timings: dict[str, float],
                 completed: bool) -> dict[str, Any]:
    """The run's report from its tensor entries and per-transformer-block facts (``seconds.total`` added later)."""
    total_error_initial = sum(t["error_initial"] * t["error_dense_norm"] for t in tensors.values())
    total_error_final = sum(t["error_final"] * t["error_dense_norm"] for t in tensors.values())
    total_reference = sum(t["error_dense_norm"] for t in tensors.values())
    weights = sum(math.prod(t["shape"]) for t in tensors.values())
    kept = sum(t["density"] * math.prod(t["shape"]) for t in tensors.values())
    accepted: dict[str, int] = {}
    per_epoch: list[float] = []
    for block in blocks:
        for key, count in block.get("icbs_blocks", {}).items():
            accepted[key] = accepted.get(key, 0) + count
    epochs = max((len(b.get("surrogate_per_epoch", [])) for b in blocks), default=0)
    for epoch in range(epochs):
        per_epoch.append(sum(
            (b["surrogate_per_epoch"][epoch] if epoch < len(b.get("surrogate_per_epoch", []))
             else b.get("surrogate_final", 0.0)) for b in blocks if "surrogate_per_epoch" in b
        ))
    summary = {
        "tensors": len(tensors),
        "weights": weights,
        "density": kept / weights if weights else 0.0,
        "sparsity": sparsity.describe(),
        "relative_error_initial": _relative(total_error_initial, total_reference),
        "relative_error_final": _relative(total_error_final, total_reference),
        "completed": completed,
    }
    if any("error_weights" in t for t in tensors.values()):
        summary["relative_error_refit"] = _relative(
            sum(t.get("error_weights", t["error_final"]) * t["error_dense_norm"] for t in tensors.values()),
            total_reference,
        )
    return {
        "qsurgeon_report": 1,
        "options": {**options.to_dict(), "density": sparsity.density},  # every effective option; the density applied
        "calibration": {"source": calibration.source, "samples": calibration.num_samples,
                        "tokens": calibration.num_tokens},
        "summary": summary,
        "icbs": {"blocks": accepted, "surrogate_initial": sum(b.get("surrogate_initial", 0.0) for b in blocks),
                 "surrogate_per_epoch": per_epoch} if options.method == "icbs" else None,
        "tensors": tensors,
        "transformer_blocks": blocks,
        "seconds": {phase: timings.get(phase, 0.0) for phase in PHASES},
    }


__all__ = ["PHASES", "PhaseTimer", "prune_report", "report_text", "tensor_report"]
