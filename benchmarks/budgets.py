"""Budgets of ``swap-tabu`` (chains × iterations) on many blocks of one family: the tables behind
``auto``'s N:M budget and ``swap-tabu``'s defaults on outlier rows (docs/solvers.md).

Three blocks per family (benchmarks/families.py) cannot tell two budgets apart: runs either reach
the best known energy or stop 1–2 % above it, so a mean over a few blocks is mostly luck. This
script runs each budget on ``--blocks`` blocks × ``--run-seeds`` from scratch (greedy start) and
prints mean gap / worst gap / share within 0.1 % / median ms per budget, one core
(NUMBA_NUM_THREADS=1). A budget is ``RxI`` (R chains of I iterations; tenure from ``--tenure``,
or 4 on N:M blocks and the default elsewhere), ``auto`` or ``auto-long``.

The reference of each block is the lowest of three ``swap-tabu`` 1 × ``--reference-iterations``
runs, one ``sa`` 4 × ``--reference-sweeps`` run and every run here; the first two are cached in
benchmarks/out/references_<family>_<B>.json (about 5 s per block at B = 256, once).

    .venv/bin/python benchmarks/budgets.py --family nm --blocks 32 --budgets 2x17500,4x8750,4x10000
    .venv/bin/python benchmarks/budgets.py --family outlier --blocks 32 --budgets 2x4000,4x2000,auto-long
    .venv/bin/python benchmarks/budgets.py --family outlier --first 32 --budgets 2x4000,auto,4x40000+move=drop-add

``RxI+name=value+...`` passes further swap-tabu parameters; ``--first`` picks held-out instances.

Writes benchmarks/out/budgets_<family>_<B>.json (or --json).
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
from qsurgeon.worker.solvers.sa import has_small_groups  # noqa: E402

REFERENCE_SEEDS = (11, 12, 13)
NM_TENURE = 4


def parse_budget(text: str, tenure: int | None, grouped: bool) -> tuple[str, dict]:
    """``RxI`` -> swap-tabu with R restarts × I iterations; ``auto`` / ``auto-long`` -> auto's choice.

    ``RxI+name=value+...`` adds swap-tabu parameters (``2x50000+move=drop-add+stall=800``).
    """
    if text in ("auto", "auto-long"):
        return "auto", {"effort": "long"} if text == "auto-long" else {}
    size, *extra = text.split("+")
    restarts, iterations = (int(part) for part in size.lower().split("x"))
    params: dict = {"restarts": restarts, "iterations": iterations}
    for item in extra:
        name, _, value = item.partition("=")
        params[name] = int(value) if value.lstrip("-").isdigit() else value
    if "tenure" not in params and (tenure is not None or grouped):
        params["tenure"] = tenure if tenure is not None else NM_TENURE
    return "swap-tabu", params


def reference(problem, grouped: bool, iterations: int, sweeps: int) -> float:
    """Lowest energy of three long swap-tabu chains and one long sa run (start: greedy)."""
    tenure = {"tenure": NM_TENURE} if grouped else {}
    energies = [solve(problem, "swap-tabu", restarts=1, iterations=iterations, seed=seed, **tenure).energy
                for seed in REFERENCE_SEEDS]
    energies.append(solve(problem, "sa", restarts=4, sweeps=sweeps, seed=5, device="cpu").energy)
    return min(energies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="nm")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=32, help="instances (seeds first..first+N-1)")
    parser.add_argument("--first", type=int, default=0, help="seed of the first instance (held-out sets)")
    parser.add_argument("--run-seeds", default="1,2")
    parser.add_argument("--budgets", default="2x17500,4x8750,4x10000")
    parser.add_argument("--tenure", type=int, default=None)
    parser.add_argument("--reference-iterations", type=int, default=100_000)
    parser.add_argument("--reference-sweeps", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=None, help="where the table goes")
    parser.add_argument("--cache", type=Path, default=None, help="where the reference energies are kept")
    args = parser.parse_args()
    instances = bench_common.sibling("instances")
    make = instances.FAMILIES[args.family]
    run_seeds = [int(seed) for seed in args.run_seeds.split(",")]
    out = bench_common.HERE / "out"
    cache_file = args.cache or out / f"references_{args.family}_{args.size}.json"
    settings = {"iterations": args.reference_iterations, "sweeps": args.reference_sweeps}
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "energies": {}}
    seeds = range(args.first, args.first + args.blocks)
    problems = [make(args.size, seed).with_x0(None) for seed in seeds]
    grouped = has_small_groups(problems[0])
    budgets = [(text, *parse_budget(text, args.tenure, grouped)) for text in args.budgets.split(",")]
    solve(problems[0], "swap-tabu", iterations=10)  # compile / load the kernels
    references = []
    for seed, problem in zip(seeds, problems):
        if str(seed) not in cache["energies"]:
            cache["energies"][str(seed)] = reference(problem, grouped, args.reference_iterations,
                                                     args.reference_sweeps)
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=1))
        references.append(cache["energies"][str(seed)])
    energies: dict[str, list[list[tuple[float, float]]]] = {text: [] for text, _, _ in budgets}
    for index, problem in enumerate(problems):
        for text, solver, params in budgets:
            runs = []
            for run_seed in run_seeds:
                started = time.perf_counter()
                answer = solve(problem, solver, seed=run_seed, **params)
                runs.append((answer.energy, time.perf_counter() - started))
            energies[text].append(runs)
        references[index] = min([references[index]] + [energy for per_block in energies.values()
                                                        for energy, _ in per_block[index]])
    rows = []
    print(f"{args.family}, B = {args.size}: {args.blocks} blocks (seeds {args.first}–{args.first + args.blocks - 1}) × "
          f"{len(run_seeds)} run seeds, from scratch, one core")
    print(f"{'budget':<12} {'mean gap':>10} {'worst':>9} {'≤0.1 %':>7} {'median ms':>10}")
    for text, solver, params in budgets:
        gaps = [((energy - best) / abs(best), seconds)
                for best, per_block in zip(references, energies[text]) for energy, seconds in per_block]
        row = {"budget": text, "solver": solver, "params": params, **bench_common.gap_summary(gaps)}
        rows.append(row)
        print(f"{text:<12} {row['mean_gap']:>10.2e} {row['worst_gap']:>9.2e} {row['within_0.1%']:>7.2f} "
              f"{row['median_ms']:>10.0f}", flush=True)
    target = args.json or out / f"budgets_{args.family}_{args.size}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"family": args.family, "size": args.size, "blocks": list(seeds),
                                  "run_seeds": run_seeds, "load": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
