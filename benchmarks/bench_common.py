"""What the solver benchmarks share: this folder taken off sys.path, and siblings loaded by path.

Every solver benchmark imports this module first (``import bench_common`` works because Python
puts a script's folder first on sys.path). Importing it takes the folder off sys.path again: a
benchmark script there could shadow a module that a library imports (torch imports ``queue``).
Sibling scripts (``instances``, ``best_known``) are then loaded by path, once per process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import numpy as np  # noqa: E402


def sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module, loaded by path the first time it is asked for."""
    key = f"qsurgeon_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


#: A run "hits" the best known energy when its gap is at most this (issue #14's 0.1 % target).
HIT = 1e-3


def gap_summary(runs: list[tuple[float, float]]) -> dict[str, float]:
    """Mean and worst gap, share of runs within HIT, median milliseconds and count of (gap, seconds)
    runs: a table cell's figures."""
    gaps = np.array([gap for gap, _ in runs])
    return {"mean_gap": float(gaps.mean()), "worst_gap": float(gaps.max()),
            "within_0.1%": float(np.mean(gaps <= HIT)),
            "median_ms": 1e3 * float(np.median([seconds for _, seconds in runs])), "runs": len(runs)}


def gap_cell(summary: dict[str, float]) -> str:
    """``mean worst ms``, right-aligned in 30 characters (the solver tables' column)."""
    return f"{summary['mean_gap']:>11.2e} {summary['worst_gap']:>9.2e} {summary['median_ms']:>7.0f}"
