"""Scan of solver configurations on every benchmark family from scratch: gap and time per config.

Written for swap-tabu's kicks (stall × kick strength) and sa's replica / schedule options:
each configuration is a solver name plus parameters, given as JSON on the command line
(``--config 'swap-tabu {"stall": 100, "kick": 4}'``, repeatable). Every family of
instances.FAMILIES at B = --size (seeds 0–2), run seeds 1 and 2, one core
(NUMBA_NUM_THREADS=1). Gap = (E − E_best)/|E_best|, E_best from benchmarks/best_known.json
(a run that goes lower is merged into it). Prints mean / worst gap and median ms per
family and configuration; writes benchmarks/out/tune_kicks_B.json.

    .venv/bin/python benchmarks/tune_kicks.py --config 'swap-tabu {}' --config 'swap-tabu {"stall": 0}'
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
import bench_common  # noqa: E402 - first: takes this folder off sys.path

import numpy as np  # noqa: E402

from qsurgeon.worker.solve import solve  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--run-seeds", default="1,2")
    parser.add_argument("--families", default=None, help="comma-separated subset of instances.FAMILIES")
    parser.add_argument("--config", action="append", required=True, help="'SOLVER {json params}'")
    args = parser.parse_args()
    instances, best_known = bench_common.sibling("instances"), bench_common.sibling("best_known")
    table = best_known.load()
    configs = []
    for text in args.config:
        name, _, params = text.partition(" ")
        configs.append((text, name, json.loads(params or "{}")))
    families = {name: make for name, make in instances.FAMILIES.items()
                if args.families is None or name in args.families.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    run_seeds = [int(s) for s in args.run_seeds.split(",")]
    problems = {(family, seed): make(args.size, seed).with_x0(None) for family, make in families.items() for seed in seeds}
    for _, name, params in configs:  # compile / load kernels outside the timings
        solve(instances.pruning_like_dense(32, 0), name, **{**params, "seed": 0})
    runs: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for (family, seed), problem in problems.items():
        for label, name, params in configs:
            for run_seed in run_seeds:
                started = time.perf_counter()
                answer = solve(problem, name, **{**params, "seed": run_seed})
                runs.setdefault((label, family), []).append((best_known.instance_id(family, args.size, seed),
                                                             answer.energy, time.perf_counter() - started))
                best_known.record(table, best_known.instance_id(family, args.size, seed), answer.energy,
                                  f"tune_kicks-{label}")
    best_known.save(table)
    rows = []
    print(f"B = {args.size}: mean gap / worst gap / median ms ({len(seeds)} blocks × {len(run_seeds)} run seeds, "
          f"load {os.getloadavg()[0]:.1f})")
    print(f"{'config':<48}" + "".join(f"{family:>28}" for family in families))
    for label, _, _ in configs:
        cells = []
        for family in families:
            values = runs[(label, family)]
            gaps = np.array([(energy - table[key]["energy"]) / abs(table[key]["energy"]) for key, energy, _ in values])
            ms = 1e3 * float(np.median([seconds for _, _, seconds in values]))
            cells.append(f"{gaps.mean():>10.2e} {gaps.max():>9.2e} {ms:>6.0f}")
            rows.append({"config": label, "family": family, "mean_gap": float(gaps.mean()),
                         "worst_gap": float(gaps.max()), "median_ms": ms})
        print(f"{label:<48}" + "".join(cells), flush=True)
    out = bench_common.HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"tune_kicks_{args.size}.json").write_text(json.dumps({"size": args.size, "load": os.getloadavg(),
                                                                  "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
