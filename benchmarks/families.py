"""Every solver's gap on every benchmark family, from scratch (no x0), at their defaults.

Families: instances.FAMILIES (MiniLM layer-wise and Fisher, rows with outlier input
channels, causal-LM rows, 4:8 groups). Gap = (E − E_best)/|E_best|, E_best from
benchmarks/best_known.json (long runs of every solver and greedy + descent; a run here that
goes lower is merged into it). Solvers: the greedy construction + swap descent alone (and
with group descent, on N:M blocks), ``sa`` (with and without the group polish),
``swap-tabu`` and ``auto`` at their defaults (start: greedy), ``sa`` from a random start
(the former default), ``sa`` 4 × 4000 sweeps with and without the polish on N:M blocks
(``auto``'s former N:M route), and D-Wave ``neal``/``tabu`` given the wall time ``auto`` took.
One core (NUMBA_NUM_THREADS=1 is set) so that times are per core.

    .venv/bin/python benchmarks/families.py [--size 256] [--seeds 0,1,2] [--families nm] [--no-dimod]

Prints mean/worst gap and median ms per (family, solver); writes benchmarks/out/families_B.json.
Also prints a fingerprint of each family's instances (SHA-256 of their matrices): the MiniLM
and causal-LM blocks are built from a forward pass cached per machine (benchmarks/cache), whose
last bits depend on the CPU's float kernels, and the searches are chaotic in those bits, so
tables from machines with different fingerprints differ run by run (docs/solvers.md, "Why
tables differ between machines"); compare solvers on one machine, over several blocks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import bench_common  # noqa: E402 - first: takes this folder off sys.path

import numpy as np  # noqa: E402

from qsurgeon.worker.solve import solve  # noqa: E402
from qsurgeon.worker.solvers import group_descent  # noqa: E402
from qsurgeon.worker.solvers.greedy import greedy_start  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--run-seeds", default="1,2")
    parser.add_argument("--families", default="", help="comma-separated subset of instances.FAMILIES")
    parser.add_argument("--no-dimod", action="store_true", help="skip neal and tabu")
    args = parser.parse_args()
    instances, best_known = bench_common.sibling("instances"), bench_common.sibling("best_known")
    table = best_known.load()
    seeds = [int(s) for s in args.seeds.split(",")]
    run_seeds = [int(s) for s in args.run_seeds.split(",")]
    solve(instances.pruning_like_dense(16, 0), "sa", sweeps=1)  # compile / load kernels
    solve(instances.pruning_like_dense(32, 0), "swap-tabu", iterations=1)
    greedy_start(instances.pruning_like_dense(16, 0))
    solve(instances.nm_block(64, 0).with_x0(None), "sa", sweeps=1, device="cpu")  # and the group move's
    results: dict[str, dict[str, list]] = {}
    fingerprints: dict = {}  # family -> running SHA-256 of its instances
    chosen = [name for name in args.families.split(",") if name] or list(instances.FAMILIES)
    for family, make in ((name, instances.FAMILIES[name]) for name in chosen):
        for seed in seeds:
            problem = make(args.size, seed).with_x0(None)
            digest = fingerprints.setdefault(family, hashlib.sha256())
            for array in (problem.Q,) if problem.Q is not None else (problem.F, problem.c):
                digest.update(np.ascontiguousarray(array).tobytes())
            key = best_known.instance_id(family, args.size, seed)
            runs: dict[str, list[tuple[float, float]]] = {}
            started = time.perf_counter()
            runs["greedy+descent"] = [(problem.energy(greedy_start(problem, groups=False)),
                                       time.perf_counter() - started)]
            if group_descent.applies(problem):
                started = time.perf_counter()
                runs["greedy+group"] = [(problem.energy(greedy_start(problem)), time.perf_counter() - started)]
            for label, solver, params in (("sa", "sa", {"device": "cpu"}),
                                          ("sa-nopolish", "sa", {"device": "cpu", "polish": "none"}),
                                          ("sa-random", "sa", {"start": "random", "device": "cpu"}),
                                          ("swap-tabu", "swap-tabu", {}), ("swap-tabu-1r", "swap-tabu", {"restarts": 1}),
                                          ("auto", "auto", {}),
                                          ("sa-4x4000", "sa", {"device": "cpu", "sweeps": 4000}),
                                          ("sa-4x4000-nopolish", "sa", {"device": "cpu", "sweeps": 4000,
                                                                         "polish": "none"})):
                if label.startswith("sa-4x4000") and not group_descent.applies(problem):
                    continue  # auto's former N:M route, for comparison
                for run_seed in run_seeds:
                    started = time.perf_counter()
                    answer = solve(problem, solver, seed=run_seed, **params)
                    runs.setdefault(label, []).append((answer.energy, time.perf_counter() - started))
            budget = float(np.median([seconds for _, seconds in runs["auto"]]))
            for label, solver, params in (("neal", "neal", {"restarts": 16, "sweeps": 1000}),
                                          ("tabu", "tabu", {"restarts": 1, "time_limit": max(budget, 0.01)})):
                if args.no_dimod:
                    break
                try:
                    started = time.perf_counter()
                    answer = solve(problem, solver, seed=1, **params)
                    runs[label] = [(answer.energy, time.perf_counter() - started)]
                except Exception as error:  # optional backends
                    print(f"  {label}: {error}")
            for label, values in runs.items():
                for energy, _ in values:
                    best_known.record(table, key, energy, f"families-{label}")
            best = table[key]["energy"]
            for label, values in runs.items():
                entry = results.setdefault(family, {}).setdefault(label, [])
                entry.extend(((energy - best) / abs(best), seconds) for energy, seconds in values)
        best_known.save(table)
    labels = ["greedy+descent", "greedy+group", "sa", "sa-nopolish", "sa-random", "swap-tabu", "swap-tabu-1r",
              "auto", "sa-4x4000", "sa-4x4000-nopolish", "neal", "tabu"]
    print(f"\nB = {args.size}, from scratch; mean gap / worst gap / median ms per family "
          f"({len(seeds)} blocks × {len(run_seeds)} run seeds; neal 16 × 1000 sweeps, tabu given auto's median time)")
    print(f"{'solver':<16}" + "".join(f"{family:>30}" for family in results))
    rows = []
    for label in labels:
        cells = []
        for family in results:
            values = results[family].get(label, [])
            if not values:
                cells.append(f"{'-':>30}")
                continue
            summary = bench_common.gap_summary(values)
            cells.append(bench_common.gap_cell(summary))
            rows.append({"solver": label, "family": family, **summary})
        print(f"{label:<16}" + "".join(cells), flush=True)
    prints = {family: digest.hexdigest()[:12] for family, digest in fingerprints.items()}
    print("instance fingerprints: " + ", ".join(f"{family} {value}" for family, value in prints.items()))
    out = bench_common.HERE / "out"
    out.mkdir(exist_ok=True)
    suffix = "" if not args.families else "_" + "_".join(chosen)
    (out / f"families_{args.size}{suffix}.json").write_text(json.dumps({"size": args.size, "load": os.getloadavg(),
                                                                "fingerprints": prints, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
