"""Scan of ``sa``'s schedule from the greedy start: |ΔE| quantile of the scale × β_rel range.

Every family of instances.FAMILIES at B = 256 (seeds 0–2), two run seeds each, 4 restarts ×
1000 sweeps (the default budget), start="greedy". Gap = (E − E_best)/|E_best| with E_best from
benchmarks/best_known.json (or the lowest energy of this scan where an instance is missing).
Prints mean gap per family and configuration; writes benchmarks/out/tune_greedy_start.json.

    .venv/bin/python benchmarks/tune_greedy_start.py [--size 256]
"""

from __future__ import annotations

import argparse
import json

import bench_common  # noqa: E402 - first: takes this folder off sys.path

import numpy as np  # noqa: E402

from qsurgeon.worker.solve import solve  # noqa: E402

QUANTILES = (0.5, 0.25, 0.1)
RANGES = ((20.0, 300.0), (5.0, 300.0), (2.0, 100.0), (1.0, 30.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    instances, best_known = bench_common.sibling("instances"), bench_common.sibling("best_known")
    table = best_known.load()
    problems = {(family, seed): make(args.size, seed) for family, make in instances.FAMILIES.items() for seed in (0, 1, 2)}
    energies: dict[tuple, float] = {}
    for quantile in QUANTILES:
        for beta in RANGES:
            for key, problem in problems.items():
                for run_seed in (1, 2):
                    answer = solve(problem, "sa", seed=run_seed, start="greedy",
                                   scale_quantile=quantile, beta_range=beta)
                    energies[(quantile, beta, key, run_seed)] = answer.energy
    best = {key: min([e for (q, b, k, s), e in energies.items() if k == key]
                     + [table.get(best_known.instance_id(key[0], args.size, key[1]), {}).get("energy", np.inf)])
            for key in problems}
    rows = []
    families = list(instances.FAMILIES)
    print(f"{'quantile':>8} {'beta range':<14}" + "".join(f"{family:>11}" for family in families) + f"{'worst':>11}")
    for quantile in QUANTILES:
        for beta in RANGES:
            gaps = {family: float(np.mean([(energies[(quantile, beta, (family, seed), s)] - best[(family, seed)])
                                           / abs(best[(family, seed)]) for seed in (0, 1, 2) for s in (1, 2)]))
                    for family in families}
            worst = max((energies[(quantile, beta, key, s)] - best[key]) / abs(best[key]) for key in problems for s in (1, 2))
            rows.append({"quantile": quantile, "beta_range": beta, "mean_gap": gaps, "worst_gap": worst})
            print(f"{quantile:>8} {str(beta):<14}" + "".join(f"{gaps[f]:>11.2e}" for f in families) + f"{worst:>11.2e}",
                  flush=True)
    out = bench_common.HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "tune_greedy_start.json").write_text(json.dumps({"size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
