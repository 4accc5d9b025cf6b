"""Solver shoot-out on pruning QUBOs: energy gap to the best known, feasibility, wall time.

Every backend answers the same seeded blocks at B ∈ {8, 16, 64, 256, 1024}: the
generators of benchmarks/instances.py (real all-MiniLM-L6-v2 layer-wise blocks, full
rank; semi-synthetic Fisher blocks, factored, rank 128 — glassy once B > 128; synthetic
pruning-like dense blocks), or local stand-ins when that file is absent. Backends whose limit is below B
are skipped. The best known energy of a block is the exhaustive optimum where B ≤ 16,
else the lowest energy any backend found. Two gaps: ``gap`` = (E − E_best)/|E_best| and
``missed`` = (E − E_best)/(E_x0 − E_best), the fraction of the improvement over the
current assignment x0 that the backend left on the table (the constant part of a
layer-wise block's energy makes ``gap`` look small; ``missed`` is immune to it).
``sa`` starts from x0 (its default: 4 restarts × 1000 sweeps), ``sa-random`` from
random assignments, ``sa-16`` uses 16 restarts like neal's 16 reads; the dimod backends
and QAOA never use x0.

    .venv/bin/python benchmarks/shootout.py            # full table (a few minutes)
    .venv/bin/python benchmarks/shootout.py --quick    # B ≤ 256, one block kind

Prints a table, writes benchmarks/out/shootout.json and a gap-vs-time plot
benchmarks/out/shootout.png, and checks the claim "sa matches or beats neal+repair's best
energy at B = 256 in less wall time". Timings are wall-clock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from qsurgeon.client.errors import QsurgeonError  # noqa: E402
from qsurgeon.worker import BlockProblem, solve  # noqa: E402
from qsurgeon.worker.solvers.registry import capabilities  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
SIZES = (8, 16, 64, 256, 1024)
QUICK_SIZES = (8, 16, 64, 256)

#: (label, registered solver, parameters, largest B to try: beyond the backend's own limit
#: where its running time would dominate the benchmark)
BACKENDS: list[tuple[str, str, dict[str, Any], int]] = [
    ("exhaustive", "exhaustive", {}, 16),
    ("exact-dimod", "exact-dimod", {}, 16),
    ("qaoa", "qaoa", {"maxiter": 30}, 12),
    ("sa", "sa", {}, 1 << 16),
    ("sa-random", "sa", {"start": "random"}, 1 << 16),
    ("sa-16", "sa", {"restarts": 16}, 1 << 16),  # as many restarts as neal has reads
    ("swap-tabu", "swap-tabu", {}, 4096),
    ("neal", "neal", {}, 2048),
    ("tabu", "tabu", {}, 2048),
    ("steepest", "steepest", {}, 2048),
]


# ---------------------------------------------------------------------- instances
def _local_layerwise(num_variables: int, seed: int) -> BlockProblem:
    """Layer-wise block (docs/icbs.md §5): diag(w)·Hₗ[S,S]·diag(w) with Hₗ = AAᵀ/T, plus the
    cross term with the fixed pruned weights of the row on the diagonal."""
    rng = np.random.default_rng(seed)
    inputs = 2 * num_variables
    activations = rng.normal(size=(inputs, 4 * inputs)) * rng.lognormal(0.0, 0.7, size=(inputs, 1))
    gram = activations @ activations.T / activations.shape[1]
    weights = rng.normal(size=inputs) * 0.05
    block, fixed = np.arange(num_variables), np.arange(num_variables, inputs)
    pruned_fixed = fixed[rng.random(fixed.size) < 0.5]
    w_block = weights[block]
    Q = w_block[:, None] * gram[np.ix_(block, block)] * w_block[None, :]
    cross = w_block * (gram[np.ix_(block, pruned_fixed)] @ weights[pruned_fixed])
    Q[np.diag_indices(num_variables)] += 2 * cross
    offset = float(weights[pruned_fixed] @ gram[np.ix_(pruned_fixed, pruned_fixed)] @ weights[pruned_fixed])
    order = np.argsort(np.abs(w_block))  # like the engine: the lowest-scoring half starts pruned
    x0 = np.zeros(num_variables, np.uint8)
    x0[order[: num_variables // 2]] = 1
    return BlockProblem.dense((Q + Q.T) / 2, k=num_variables // 2, offset=offset, x0=x0, id=f"layerwise-{num_variables}")


def _local_fisher(num_variables: int, seed: int) -> BlockProblem:
    """Fisher block (docs/icbs.md §4): F = G·diag(w0) with N = B/4 per-sample gradients."""
    rng = np.random.default_rng(seed)
    samples = max(2, num_variables // 4)
    w0 = rng.normal(size=num_variables) * 0.05
    gradients = rng.normal(size=(samples, num_variables)) / np.sqrt(samples)
    gradient_mean = gradients.mean(axis=0)
    F = gradients * w0[None, :]
    c = -0.75 * w0 * gradient_mean + 1e-3 * w0**2
    order = np.argsort(np.abs(w0))
    x0 = np.zeros(num_variables, np.uint8)
    x0[order[: num_variables // 2]] = 1
    return BlockProblem.factored(F, c, k=num_variables // 2, x0=x0, id=f"fisher-{num_variables}")


def instance_makers() -> dict[str, Callable[[int, int], BlockProblem]]:
    """The sa engineer's generators (benchmarks/instances.py) when present, else local ones."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import instances  # type: ignore[import-not-found]

        return {"layerwise": instances.layerwise_block, "fisher": instances.fisher_block,
                "synthetic": instances.pruning_like_dense}
    except (ImportError, AttributeError):  # instances.py absent: self-contained fallbacks
        return {"layerwise": _local_layerwise, "fisher": _local_fisher}


# ---------------------------------------------------------------------- running
def run_one(label: str, solver: str, params: dict[str, Any], problem: BlockProblem, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        solution = solve(problem, solver, seed=seed, **params)
    except QsurgeonError as error:
        return {"backend": label, "error": str(error)}
    wall = time.perf_counter() - started
    return {
        "backend": label, "energy": solution.energy, "seconds": wall,
        "raw_feasible_rate": float(solution.metadata.get("raw_feasible_rate", 1.0)),
        "penalty": solution.metadata.get("penalty"),
    }


def warm_up(backends: list[tuple[str, str, dict[str, Any], int]]) -> None:
    """Compile JIT kernels and load modules before anything is timed."""
    tiny = _local_layerwise(8, 0)
    for _, solver, params, _ in backends:
        try:
            solve(tiny, solver, seed=0, **params)
        except QsurgeonError:
            pass


def available_backends(names: set[str] | None) -> list[tuple[str, str, dict[str, Any], int]]:
    chosen = []
    for entry in BACKENDS:
        if names and entry[0] not in names:
            continue
        info = capabilities(entry[1])
        if not info.installed:
            print(f"skipping {entry[0]}: {info.missing}")
            continue
        chosen.append(entry)
    return chosen


def shootout(sizes: tuple[int, ...], kinds: list[str], seeds: list[int], names: set[str] | None) -> list[dict[str, Any]]:
    makers = instance_makers()
    backends = available_backends(names)
    warm_up(backends)
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for size in sizes:
            for seed in seeds:
                problem = makers[kind](size, seed)
                results = []
                for label, solver, params, largest in backends:
                    if size > min(largest, capabilities(solver).max_variables):
                        continue
                    results.append(run_one(label, solver, params, problem, seed))
                    print(f"  {kind:<9} B={size:<5} seed {seed}  {label:<12} "
                          + (f"{results[-1]['seconds']:.3f}s" if "seconds" in results[-1] else results[-1]["error"]),
                          file=sys.stderr)
                solved = [r for r in results if "energy" in r]
                best = min(r["energy"] for r in solved)
                exact = any(r["backend"] in ("exhaustive", "exact-dimod") for r in solved)
                for r in results:
                    r.update(kind=kind, B=size, seed=seed, best_known=best, best_is_exact=exact,
                             current_energy=None if problem.x0 is None else problem.energy(problem.x0))
                    if "energy" in r:
                        r["gap"] = (r["energy"] - best) / max(abs(best), 1e-300)
                        room = None if problem.x0 is None else problem.energy(problem.x0) - best
                        r["missed"] = (r["energy"] - best) / room if room and room > 0 else None
                rows.extend(results)
    return rows


# ---------------------------------------------------------------------- reporting
def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'kind':<9} {'B':>5}  {'backend':<12} {'gap %':>9} {'missed %':>9} {'raw feas':>8} {'seconds':>8}")
    for r in rows:
        if "energy" not in r:
            continue
        missed = "-" if r["missed"] is None else f"{100 * r['missed']:.3f}"
        print(f"{r['kind']:<9} {r['B']:>5}  {r['backend']:<12} {100 * r['gap']:>9.3f} {missed:>9} "
              f"{r['raw_feasible_rate']:>8.2f} {r['seconds']:>8.3f}")


def claim(rows: list[dict[str, Any]], size: int = 256) -> list[dict[str, Any]]:
    """Does sa (and sa from random starts) match or beat neal+repair's best energy at
    B = size in less wall time?"""
    verdicts = []
    for kind in sorted({r["kind"] for r in rows}):
        for seed in sorted({r["seed"] for r in rows}):
            pick = {r["backend"]: r for r in rows if r["kind"] == kind and r["B"] == size and r["seed"] == seed and "energy" in r}
            if "neal" not in pick:
                continue
            neal = pick["neal"]
            for label in ("sa", "sa-random", "sa-16"):
                if label not in pick:
                    continue
                sa = pick[label]
                tolerance = 1e-9 * max(1.0, abs(neal["energy"]))
                verdict = {
                    "kind": kind, "B": size, "seed": seed, "sa": label, "sa_energy": sa["energy"],
                    "neal_energy": neal["energy"], "sa_seconds": sa["seconds"], "neal_seconds": neal["seconds"],
                    "energy_matches_or_beats": sa["energy"] <= neal["energy"] + tolerance,
                    "relative_energy_difference": (sa["energy"] - neal["energy"]) / max(abs(neal["energy"]), 1e-300),
                    "neal_over_sa_time": neal["seconds"] / sa["seconds"],
                }
                verdict["holds"] = verdict["energy_matches_or_beats"] and verdict["neal_over_sa_time"] > 1.0
                verdicts.append(verdict)
    for v in verdicts:
        print(f"claim at B={v['B']} ({v['kind']}, seed {v['seed']}): {v['sa']} {v['sa_energy']:.8g} vs neal "
              f"{v['neal_energy']:.8g} ({v['sa']} − neal = {100 * v['relative_energy_difference']:+.3f} % of neal's), "
              f"neal/{v['sa']} wall time = {v['neal_over_sa_time']:.2f}x -> {'HOLDS' if v['holds'] else 'DOES NOT HOLD'}")
    return verdicts


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    sizes = sorted({r["B"] for r in rows})
    backends = [entry[0] for entry in BACKENDS if any(r["backend"] == entry[0] for r in rows)]
    markers = dict(zip(sizes, "o^sDPX*"))
    palette = [plt.get_cmap("tab10")(index) for index in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # no grey: B legend uses it
    colours = {name: palette[index % len(palette)] for index, name in enumerate(backends)}
    figure, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.8), squeeze=False)
    floor = 1e-6
    for axis, kind in zip(axes[0], kinds):
        for r in rows:
            if r["kind"] != kind or "energy" not in r:
                continue
            axis.scatter(r["seconds"], max(r["missed"] if r["missed"] is not None else r["gap"], floor), color=colours[r["backend"]], marker=markers[r["B"]],
                         s=40, alpha=0.85)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("wall time per block (s)")
        axis.set_ylabel(f"(E − best)/(E_x0 − best); {floor:g} = best known")
        axis.set_title(f"{kind} blocks")
        axis.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[name], marker="o", linestyle="", label=name) for name in backends]
    handles += [plt.Line2D([], [], color="black", marker=markers[size], linestyle="", fillstyle="none",
                           label=f"B = {size}") for size in sizes]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B ≤ 256, layer-wise blocks only")
    parser.add_argument("--sizes", type=int, nargs="+", help="override the block sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--backends", nargs="+", help="only these backend labels")
    arguments = parser.parse_args()
    sizes = tuple(arguments.sizes) if arguments.sizes else (QUICK_SIZES if arguments.quick else SIZES)
    kinds = ["layerwise"] if arguments.quick else list(instance_makers())
    rows = shootout(sizes, kinds, arguments.seeds, set(arguments.backends) if arguments.backends else None)
    print_table(rows)
    verdicts = claim(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    name = "shootout-quick" if arguments.quick else "shootout"
    if arguments.sizes:
        name += "-B" + "-".join(str(size) for size in sizes)
    (OUT / f"{name}.json").write_text(json.dumps({"rows": rows, "claim_B256": verdicts}, indent=1))
    plot(rows, OUT / f"{name}.png")
    print(f"wrote {OUT / f'{name}.json'} and {OUT / f'{name}.png'}")


if __name__ == "__main__":
    main()
