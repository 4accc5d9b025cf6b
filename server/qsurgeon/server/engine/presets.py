"""``qsurgeon prune --preset NAME``: named sets of prune options, chosen from measurements.

A preset is a dict of :class:`~qsurgeon.server.engine.run.PruneOptions` defaults, with
changes per model kind; options the user gives explicitly override it. It lives in the
engine, not beside the benchmark that measured it, so ``qsurgeon prune`` loads neither
the benchmark nor its dependencies.
"""

from __future__ import annotations

from typing import Any

from qsurgeon.client.errors import UsageError

#: calibration samples of the quality preset (and of the benchmark's MiniLM runs): the
#: largest lever measured — 128 → 256 samples added 0.014 of cosine at density 0.5
QUALITY_SAMPLES = 256
#: ``--preset NAME``: defaults for PruneOptions that explicit options override. Chosen
#: from the quality benchmark's measurements (docs/results.md): ``quality`` is the best iCBS
#: combination measured — one epoch from SparseGPT's mask, then refit, at coverage 1/6
#: (1/3 scored the same — 0.9497 vs 0.9496 at density 0.5, 0.909 / 0.841 / 0.903 vs
#: 0.909 / 0.843 / 0.903 at 0.4 / 0.3 / 2:4 — with 20 % more blocks: only the 1536-wide
#: rows get fewer; a second epoch, damping 0.001 and blocks of 64 were all within
#: ±0.0015, the run-to-run spread);
#: ``fast`` is Wanda plus one epoch of iCBS, no refit.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"method": "icbs", "init": "wanda", "epochs": 1, "refit": False},
    "quality": {"method": "icbs", "init": "sparsegpt", "epochs": 1, "refit": True, "samples": QUALITY_SAMPLES,
                "coverage": 1 / 6},
}
#: What a preset changes for one model kind (see :func:`qsurgeon.server.models.loading.model_kind`). Causal LMs:
#: on the benchmark LM, calibrated on text unlike its own, blocks of 128 move far from
#: the start and fit the calibration text (perplexity worse than Wanda + refit at every
#: density); blocks of 8 from Wanda's mask, refit damping 0.001, beat SparseGPT and Wanda
#: + refit at every density on 3 seeds (docs/results.md). On MiniLM those settings give
#: 0.9425 at density 0.5 instead of 0.950, hence per kind.
PRESETS_BY_KIND: dict[str, dict[str, dict[str, Any]]] = {
    "quality": {"causal-lm": {"init": "wanda", "block_size": 8, "damp": 0.001, "coverage": 1 / 3}},
}


def apply_preset(preset: str | None, explicit: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """PruneOptions values: the preset's, its changes for the model ``kind``, then every
    explicitly given option on top.

    ``explicit`` must hold only the options the user actually set (not argparse defaults),
    so ``--preset quality --epochs 4`` runs the quality preset with four epochs.
    """
    if preset is None:
        return dict(explicit)
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **PRESETS_BY_KIND.get(preset, {}).get(kind or "", {}), **explicit}
