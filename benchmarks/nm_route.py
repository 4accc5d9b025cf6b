"""Which solver ``auto`` should give N:M blocks, by block size: the table behind TABU_GROUPS_MAX_VARIABLES.

For 4:8 blocks (instances.nm_block) of B = 64 … 1024, from scratch, runs both N:M routes of
``solvers/auto.py`` at effort "default" with their budgets read from ``auto.BUDGETS``:

- ``swap-tabu`` with the "swap-tabu-groups" budget (tenure 4, 4 × 10,000 iterations);
- ``sa`` with the "sa-groups" budget (8 × 4000 sweeps, each chain's best state group-descended);

and prints mean gap / worst gap / share within 0.1 % / median ms per (B, route). The gap is to
the best of: benchmarks/best_known.json (where the instance is there), every run here, and a
long ``sa`` reference (4 × 20,000 sweeps) for instances the JSON lacks. One core
(NUMBA_NUM_THREADS=1). Writes benchmarks/out/nm_route.json; best_known.json is not changed.

    .venv/bin/python benchmarks/nm_route.py [--sizes 64,128,256,384,512,1024] [--blocks 4] [--run-seeds 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import bench_common  # noqa: E402 - first: takes this folder off sys.path


from qsurgeon.worker.solve import solve  # noqa: E402
from qsurgeon.worker.solvers import auto  # noqa: E402

ROUTES = {"swap-tabu": ("swap-tabu", "swap-tabu-groups"), "sa": ("sa", "sa-groups")}
REFERENCE = {"restarts": 4, "sweeps": 20000, "device": "cpu"}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128,256,384,512,1024")
    parser.add_argument("--blocks", type=int, default=4, help="instances (seeds 0..N-1) per size")
    parser.add_argument("--run-seeds", default="1,2")
    parser.add_argument("--json", type=Path, default=bench_common.HERE / "out" / "nm_route.json",
                        help="where the table goes")
    args = parser.parse_args()
    instances, best_known = bench_common.sibling("instances"), bench_common.sibling("best_known")
    table = best_known.load()
    run_seeds = [int(seed) for seed in args.run_seeds.split(",")]
    solve(instances.nm_block(64, 0).with_x0(None), "sa", sweeps=1, device="cpu")  # compile the kernels
    solve(instances.nm_block(64, 0).with_x0(None), "swap-tabu", iterations=1)
    rows = []
    print(f"{'B':>5} {'route':<10} {'mean gap':>10} {'worst':>9} {'≤0.1 %':>7} {'median ms':>10}")
    for size in (int(value) for value in args.sizes.split(",")):
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ROUTES}
        references = []
        for seed in range(args.blocks):
            problem = instances.nm_block(size, seed).with_x0(None)
            energies: dict[str, list[tuple[float, float]]] = {}
            for name, (solver, budget) in ROUTES.items():
                params = dict(auto.BUDGETS[(budget, "default")]) | ({"device": "cpu"} if solver == "sa" else {})
                for run_seed in run_seeds:
                    started = time.perf_counter()
                    answer = solve(problem, solver, seed=run_seed, **params)
                    energies.setdefault(name, []).append((answer.energy, time.perf_counter() - started))
            entry = table.get(best_known.instance_id("nm", size, seed))
            best = entry["energy"] if entry else solve(problem, "sa", seed=12345, **REFERENCE).energy
            best = min([best] + [energy for values in energies.values() for energy, _ in values])
            references.append(best)
            for name, values in energies.items():
                runs[name].extend(((energy - best) / abs(best), seconds) for energy, seconds in values)
        for name, values in runs.items():
            row = {"size": size, "route": name, **bench_common.gap_summary(values)}
            rows.append(row)
            print(f"{size:>5} {name:<10} {row['mean_gap']:>10.2e} {row['worst_gap']:>9.2e} "
                  f"{row['within_0.1%']:>7.2f} {row['median_ms']:>10.0f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"blocks": args.blocks, "run_seeds": run_seeds,
                                                   "load": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
