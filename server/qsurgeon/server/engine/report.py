"""What a prune run reports: seconds per phase, the error of every tensor, the summary (``report.json``).

Errors are relative to the dense layer's output energy ‖W0 A‖² (docs/icbs.md §5), so
tensors of different sizes add up and compare; the summary weights each tensor by that
energy, which makes it the relative error of all pruned layers together.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import torch

from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.outputs import report_json
from qsurgeon.server.models.calibration import CalibrationData
from qsurgeon.server.models.capture import relative_error, weight_error
from qsurgeon.server.pruning.sparsity import Sparsity

#: report phases, in order; each gets its seconds in ``report["seconds"]``
PHASES: tuple[str, ...] = ("load", "calibrate", "init", "icbs", "refit", "save")


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


def tensor_report(weight0: torch.Tensor, gram: torch.Tensor, initial: torch.Tensor, final: torch.Tensor,
                  weight: torch.Tensor | None) -> dict[str, Any]:
    """One tensor's entry: density and the relative error of the initial mask, the final mask and the refit."""
    error_initial, reference = relative_error(weight0, initial, gram)
    error_final, _ = relative_error(weight0, final, gram)
    entry = {
        "shape": list(weight0.shape),
        "density": 1.0 - float(final.float().mean()),
        "error_initial": _relative(error_initial, reference),
        "error_final": _relative(error_final, reference),
        "error_dense_norm": reference,
    }
    if weight is not None:
        entry["error_weights"] = _relative(weight_error(weight0, weight, gram), reference)
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
