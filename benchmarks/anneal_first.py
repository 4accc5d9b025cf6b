"""How long ``swap-tabu`` should anneal before searching on large blocks: the table behind its default.

On blocks whose largest group exceeds ``swap_tabu.AUTO_ANNEAL_ABOVE`` variables, ``swap-tabu``
(and so ``auto``) first runs ``sa`` for ``anneal_sweeps`` sweeps and searches from its answer.
This runs ``swap-tabu`` at its defaults with several ``anneal_sweeps`` on single-row families
(instances.FAMILIES minus N:M, which ``auto`` sends to ``sa`` at these sizes) and prints mean
gap / worst gap / median ms per (family, anneal_sweeps). The gap is to the best of
benchmarks/best_known.json (where the instance is there) and every run here, so it ranks
the settings against each other. One core (NUMBA_NUM_THREADS=1). Writes
benchmarks/out/anneal_first_B.json; best_known.json is not changed.

    .venv/bin/python benchmarks/anneal_first.py [--size 1024] [--blocks 4] [--sweeps 1000,2000,4000,8000]
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

FAMILIES = ("layerwise", "fisher", "outlier", "causal")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4, help="instances (seeds 0..N-1) per family")
    parser.add_argument("--sweeps", default="1000,2000,4000,8000", help="anneal_sweeps values to compare")
    parser.add_argument("--run-seeds", default="1,2")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", type=Path, help="where the table goes (default benchmarks/out/anneal_first_B.json)")
    args = parser.parse_args()
    instances, best_known = bench_common.sibling("instances"), bench_common.sibling("best_known")
    table = best_known.load()
    settings = [int(value) for value in args.sweeps.split(",")]
    run_seeds = [int(seed) for seed in args.run_seeds.split(",")]
    solve(instances.pruning_like_dense(32, 0), "swap-tabu", iterations=1, anneal_sweeps=1)  # compile
    rows = []
    families = [name for name in args.families.split(",") if name]
    print(f"B = {args.size}, swap-tabu defaults; mean gap / worst gap / median ms "
          f"({args.blocks} blocks × {len(run_seeds)} run seeds)")
    print(f"{'anneal_sweeps':<14}" + "".join(f"{family:>30}" for family in families))
    results: dict[int, dict[str, list[tuple[float, float]]]] = {sweeps: {} for sweeps in settings}
    for family in families:
        for seed in range(args.blocks):
            problem = instances.FAMILIES[family](args.size, seed).with_x0(None)
            energies: dict[int, list[tuple[float, float]]] = {}
            for sweeps in settings:
                for run_seed in run_seeds:
                    started = time.perf_counter()
                    answer = solve(problem, "swap-tabu", seed=run_seed, anneal_sweeps=sweeps)
                    energies.setdefault(sweeps, []).append((answer.energy, time.perf_counter() - started))
            entry = table.get(best_known.instance_id(family, args.size, seed))
            best = min(([entry["energy"]] if entry else []) + [e for values in energies.values() for e, _ in values])
            for sweeps, values in energies.items():
                results[sweeps].setdefault(family, []).extend(((e - best) / abs(best), s) for e, s in values)
    for sweeps in settings:
        cells = []
        for family in families:
            summary = bench_common.gap_summary(results[sweeps][family])
            cells.append(bench_common.gap_cell(summary))
            rows.append({"anneal_sweeps": sweeps, "family": family, **summary})
        print(f"{sweeps:<14}" + "".join(cells), flush=True)
    path = args.json or bench_common.HERE / "out" / f"anneal_first_{args.size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(
        {"size": args.size, "blocks": args.blocks, "run_seeds": run_seeds, "load": os.getloadavg(), "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
