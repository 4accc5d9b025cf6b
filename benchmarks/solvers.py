"""``sa`` and ``swap-tabu`` block-solver benchmark: energy gap to the best known, wall time, proposals per second.

For B ∈ {16, 64, 256, 1024, 4096} and two instance families from ``instances.py`` (real
MiniLM layer-wise blocks, full rank; Fisher blocks, N = 128 < B, semi-synthetic gradients):

- best known energy: the exhaustive optimum where B ≤ 24, else the lowest of a long
  multi-restart ``sa`` run (random starts and x0 starts), a greedy best-swap descent
  from each of those answers and from x0, and a long ``swap-tabu`` run (from x0; at
  B > 256 from the long ``sa`` answer);
- ``sa`` with default parameters from x0 (``start=auto``) and from random starts: gap
  ``(E − E_best)/|E_best|``, ``missed`` = ``(E − E_best)/(E_x0 − E_best)`` (the share of the
  possible improvement over x0 left on the table; the constant part of a layer-wise
  block's energy makes ``gap`` look small), wall seconds, proposals per second;
- ``swap-tabu`` from x0 (2 restarts × 3000 iterations, ``anneal_sweeps=0``), and
  ``swap-tabu`` after an ``sa`` run of default length (``anneal_sweeps=1000``, 1000
  iterations): gap, wall seconds (at B = 4096 both stop at a time limit, TABU_TIME_LIMIT);
- throughput on a batch of 64 problems (16 at dense B = 4096: 64 MiB each), 4 restarts
  × 100 sweeps each;
- short runs from x0 on six B = 256 layer-wise blocks, four seeds each (mean and worst gap,
  share of runs within 0.1 % of the best known, time) for ``sa`` and ``swap-tabu``
  configurations: the "0.1 % in ≤ 100 ms" goal.

Proposals per second are also given per CPU-second (process time of all threads), which
is the per-core rate and is less disturbed by other processes sharing the machine; wall
figures on a shared machine are noisy. Short runs also report their median CPU time (a
run's restarts run in parallel, so on an idle machine wall ≈ CPU time / cores at best).

    .venv/bin/python benchmarks/solvers.py            # full (~15 minutes on 2 busy cores)
    .venv/bin/python benchmarks/solvers.py --quick    # B ≤ 1024, fewer seeds (< 2 minutes)
    .venv/bin/python benchmarks/solvers.py --short-only   # the B = 256 short-run table only

Prints a table and writes benchmarks/out/solvers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
# `python benchmarks/solvers.py` puts this folder first on sys.path, where a benchmark script
# may shadow a standard module (e.g. queue.py, which torch imports); load instances by path.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402

from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402
from qsurgeon.worker.solve import solve, solve_batch  # noqa: E402


def _load_instances():
    spec = importlib.util.spec_from_file_location("qsurgeon_bench_instances", HERE / "instances.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


instances = _load_instances()
OUT = HERE / "out"
SIZES = (16, 64, 256, 1024, 4096)
QUICK_SIZES = (16, 64, 256, 1024)
#: layer-wise B = 256 blocks of the short-run table (seeds of ``layerwise_block``)
SHORT_RUN_BLOCKS = tuple(range(6))
#: sweeps per restart in the batch throughput runs (the rate hardly depends on it)
BATCH_SWEEPS = 100
FAMILIES: dict[str, Callable[[int, int], BlockProblem]] = {
    "layerwise": instances.layerwise_block,
    "fisher": instances.fisher_block,
}


def greedy_swap(problem: BlockProblem, x: np.ndarray, max_steps: int = 5000) -> np.ndarray:
    """Steepest descent over single swaps (one 1 ↔ one 0) for one-group problems."""
    Q = problem.dense_Q()
    diag = np.diag(Q)
    x = x.astype(np.float64).copy()
    h = Q @ x
    for _ in range(max_steps):
        ones = np.nonzero(x == 1)[0]
        zeros = np.nonzero(x == 0)[0]
        if not ones.size or not zeros.size:
            break
        # ΔE of x_i: 0→1 (rows) and x_j: 1→0 (columns)
        gain = (2 * h[zeros] + diag[zeros])[:, None] + (diag[ones] - 2 * h[ones])[None, :] - 2 * Q[np.ix_(zeros, ones)]
        flat = int(np.argmin(gain))
        row, column = divmod(flat, ones.size)
        if gain[row, column] >= -1e-15 * max(1.0, abs(float(h @ x))):
            break
        i, j = zeros[row], ones[column]
        x[i], x[j] = 1.0, 0.0
        h += Q[:, i] - Q[:, j]
    return x.astype(np.uint8)


def best_known(problem: BlockProblem, quick: bool) -> tuple[float, str]:
    """The exhaustive optimum (B ≤ 24) or the best of long sa and swap-tabu runs and greedy descents."""
    if problem.num_variables <= 24:
        return solve(problem, "exhaustive").energy, "exhaustive"
    size = problem.num_variables
    sweeps = {True: 3000, False: 20000}[quick] if size <= 256 else (2000 if size <= 1024 else 1000)
    restarts = 16 if size <= 256 and not quick else 8
    limit = 10.0 if quick else 40.0
    candidates = []
    long_runs = []
    for start in ("random", "x0"):
        answer = solve(problem, "sa", seed=12345, restarts=restarts, sweeps=sweeps, start=start, time_limit=limit)
        long_runs.append(answer)
        candidates.append((answer.energy, f"sa-long-{start}"))
        polished = greedy_swap(problem, answer.x)
        candidates.append((problem.energy(polished), f"sa-long-{start}+greedy"))
    if size <= 1024:  # from x0 the descent takes thousands of O(B²) steps at B = 4096
        candidates.append((problem.energy(greedy_swap(problem, problem.x0)), "greedy-from-x0"))
    if size <= 256:
        tabu = solve(problem, "swap-tabu", seed=12345, restarts=4, iterations=5000 if quick else 20000)
    else:  # descending from x0 one best swap at a time is slow at large B: start from the long sa answer
        start = problem.with_x0(min(long_runs, key=lambda answer: answer.energy).x)
        tabu = solve(start, "swap-tabu", seed=12345, restarts=2, iterations=2000 if size <= 1024 else 300,
                     anneal_sweeps=0, time_limit=limit)
    candidates.append((tabu.energy, "swap-tabu-long"))
    return min(candidates)


def _gaps(energy: float, best: float, at_x0: float) -> dict[str, float]:
    improvement = at_x0 - best
    return {
        "gap": (energy - best) / abs(best) if best else energy - best,
        "missed": (energy - best) / improvement if improvement > 0 else 0.0,
    }


def _timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


#: Seconds allowed to each swap-tabu run of the per-size table at B = 4096 (an iteration scans
#: a 4096² Q: 3–16 ms); smaller blocks run their full budget.
TABU_TIME_LIMIT = {4096: 15.0}


def bench_tabu(problem: BlockProblem, best: float, **params: Any) -> dict[str, Any]:
    """One swap-tabu run from x0 (seed 1): gap, wall seconds, iterations done."""
    limit = TABU_TIME_LIMIT.get(problem.num_variables)
    extra = {} if limit is None else {"time_limit": limit}
    answer, wall, _ = _timed(lambda: solve(problem, "swap-tabu", seed=1, **params, **extra))
    return {"energy": answer.energy, **_gaps(answer.energy, best, problem.energy(problem.x0)), "seconds": wall,
            "iterations": answer.metadata["iterations"], "stopped_by_time_limit": answer.metadata["stopped_by_time_limit"]}


def bench_single(problem: BlockProblem, best: float, start: str) -> dict[str, Any]:
    answer, wall, cpu = _timed(lambda: solve(problem, "sa", seed=1, start=start))
    proposals = answer.restarts * answer.sweeps * problem.num_variables
    return {
        "energy": answer.energy, **_gaps(answer.energy, best, problem.energy(problem.x0)),
        "seconds": wall, "proposals_per_s": proposals / wall, "proposals_per_cpu_s": proposals / max(cpu, 1e-9),
        "acceptance": answer.metadata["acceptance_rate"],
    }


def bench_batch(family: str, size: int, count: int, sweeps: int = BATCH_SWEEPS) -> dict[str, Any]:
    problems = [FAMILIES[family](size, 1000 + index) for index in range(count)]
    answers, wall, cpu = _timed(lambda: solve_batch(problems, "sa", seed=1, sweeps=sweeps))
    proposals = sum(a.restarts * a.sweeps * p.num_variables for a, p in zip(answers, problems))
    improved = np.mean([a.energy < p.energy(p.x0) for a, p in zip(answers, problems)])
    return {"batch": count, "sweeps": sweeps, "restarts": answers[0].restarts, "seconds": wall, "proposals_per_s": proposals / wall,
            "proposals_per_cpu_s": proposals / max(cpu, 1e-9), "share_improved_over_x0": float(improved)}


#: (restarts, sweeps, beta_range) of the short sa runs at B = 256; None is the default range, and the
#: former x0 default (10, 10000) is kept as a reference row.
SHORT_RUNS = ((1, 100, None), (2, 200, None), (4, 500, None), (4, 1000, None), (4, 1000, (10.0, 10000.0)),
              (4, 2000, None), (4, 4000, None), (4, 4000, (10.0, 10000.0)), (8, 4000, None))
#: swap-tabu configurations of the same table: (restarts, iterations, anneal_sweeps); (2, 3000, 0) is the default.
SHORT_TABU_RUNS = ((1, 1000, 0), (2, 1000, 0), (1, 3000, 0), (2, 3000, 0), (2, 6000, 0), (2, 2000, 250))


def _short_configs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(solver, parameters, table fields) of every short run, sa first."""
    configs = []
    for restarts, sweeps, beta_range in SHORT_RUNS:
        params = {"restarts": restarts, "sweeps": sweeps, **({} if beta_range is None else {"beta_range": beta_range})}
        configs.append(("sa", params, {"restarts": restarts, "sweeps": sweeps, "beta_range": beta_range or "default"}))
    for restarts, iterations, anneal in SHORT_TABU_RUNS:
        params = {"restarts": restarts, "iterations": iterations, **({"anneal_sweeps": anneal} if anneal else {})}
        configs.append(("swap-tabu", params, {"restarts": restarts, "iterations": iterations, "anneal_sweeps": anneal}))
    return configs


def _short_label(entry: dict[str, Any]) -> str:
    if entry["solver"] == "sa":
        return f"sa        {entry['restarts']:>2} x {entry['sweeps']:>5} sweeps, beta {str(entry['beta_range']):<14}"
    anneal = f" after sa {entry['anneal_sweeps']} sweeps" if entry["anneal_sweeps"] else ""
    return f"swap-tabu {entry['restarts']:>2} x {entry['iterations']:>5} iterations{anneal:<22}"


def fastest_within(problems: list[BlockProblem], bests: list[float], tolerance: float = 1e-3,
                   seeds: tuple[int, ...] = (2, 3, 4, 5)) -> list[dict[str, Any]]:
    """Short configurations from x0 on the B = 256 layer-wise blocks: gap and time of each.

    Every block is solved with several seeds, because one run's gap on these glassy blocks
    varies by a factor of several from seed to seed.
    """
    runs = []
    for solver, params, fields in _short_configs():
        energies, seconds, cpu_seconds = np.empty((len(problems), len(seeds))), [], []
        for index, problem in enumerate(problems):
            for column, seed in enumerate(seeds):
                answer, wall, cpu = _timed(lambda: solve(problem, solver, seed=seed, start="x0", **params))
                energies[index, column] = answer.energy
                seconds.append(wall)
                cpu_seconds.append(cpu)
        runs.append(({"solver": solver, **fields, "median_cpu_seconds": float(np.median(cpu_seconds))}, energies,
                     seconds))
    # a short run that beats the reference runs becomes the best known (never a negative gap)
    best = np.minimum(np.asarray(bests, np.float64), np.min([run[1].min(axis=1) for run in runs], axis=0))
    rows = []
    for fields, energies, seconds in runs:
        gaps = ((energies - best[:, None]) / np.abs(best[:, None])).ravel()
        rows.append({**fields, "runs": len(gaps), "mean_gap": float(np.mean(gaps)), "worst_gap": float(np.max(gaps)),
                     "share_within": float(np.mean(np.array(gaps) <= tolerance)),
                     "median_seconds": float(np.median(seconds)), "max_seconds": float(np.max(seconds)),
                     "within": bool(np.max(gaps) <= tolerance)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B ≤ 1024, one seed, smaller batches")
    parser.add_argument("--short-only", action="store_true",
                        help="only the B = 256 short-run table (~3 minutes); writes benchmarks/out/solvers_short.json")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    sizes = () if args.short_only else QUICK_SIZES if args.quick else SIZES
    seeds = (0,) if args.quick else (0, 1, 2)
    solve(instances.pruning_like_dense(16, 0), "sa", sweeps=1)  # compile or load the kernels first
    solve(instances.fisher_block(16, 0), "sa", sweeps=1)
    solve(instances.pruning_like_dense(16, 0), "swap-tabu", iterations=1)
    rows: list[dict[str, Any]] = []
    header = (f"{'family':<10}{'B':>6} {'best by':<22}{'gap x0':>9}{'missed':>8}{'gap rnd':>9}{'s x0':>8}"
              f"{'Mprop/s':>9}{'/cpu-s':>8}{'batch':>6}{'Mprop/s':>9}{'/cpu-s':>8}"
              f"{'tabu gap':>10}{'s':>7}{'sa+tabu':>10}{'s':>7}")
    print(header)
    for family, maker in FAMILIES.items():
        for size in sizes:
            per_seed = []
            for seed in seeds:
                problem = maker(size, seed)
                best, source = best_known(problem, args.quick)
                runs = {"sa_x0": bench_single(problem, best, "auto"), "sa_random": bench_single(problem, best, "random"),
                        "tabu_x0": bench_tabu(problem, best, anneal_sweeps=0),
                        "sa_tabu": bench_tabu(problem, best, anneal_sweeps=1000, iterations=1000)}
                if min(run["energy"] for run in runs.values()) < best:  # the long runs hit their time limit
                    best, source = min((run["energy"], f"default-{name}") for name, run in runs.items())
                    runs = {name: {**run, **_gaps(run["energy"], best, problem.energy(problem.x0))}
                            for name, run in runs.items()}
                per_seed.append({"seed": seed, "best": best, "best_by": source,
                                 "x0_energy": problem.energy(problem.x0), **runs})
            dense_big = family == "layerwise" and size >= 4096
            batch_size = (16 if dense_big else 64) if not args.quick else (4 if size >= 1024 else 16)
            batch = bench_batch(family, size, batch_size)
            row = {"family": family, "B": size, "seeds": per_seed, "batch": batch,
                   "mean_gap_x0": float(np.mean([s["sa_x0"]["gap"] for s in per_seed])),
                   "mean_missed_x0": float(np.mean([s["sa_x0"]["missed"] for s in per_seed])),
                   "mean_gap_random": float(np.mean([s["sa_random"]["gap"] for s in per_seed])),
                   "mean_seconds_x0": float(np.mean([s["sa_x0"]["seconds"] for s in per_seed])),
                   "proposals_per_s": float(np.mean([s["sa_x0"]["proposals_per_s"] for s in per_seed])),
                   "proposals_per_cpu_s": float(np.mean([s["sa_x0"]["proposals_per_cpu_s"] for s in per_seed])),
                   "mean_gap_tabu_x0": float(np.mean([s["tabu_x0"]["gap"] for s in per_seed])),
                   "mean_seconds_tabu_x0": float(np.mean([s["tabu_x0"]["seconds"] for s in per_seed])),
                   "mean_gap_sa_tabu": float(np.mean([s["sa_tabu"]["gap"] for s in per_seed])),
                   "mean_seconds_sa_tabu": float(np.mean([s["sa_tabu"]["seconds"] for s in per_seed]))}
            rows.append(row)
            print(f"{family:<10}{size:>6} {per_seed[0]['best_by']:<22}{row['mean_gap_x0']:>9.2e}"
                  f"{row['mean_missed_x0']:>8.3f}{row['mean_gap_random']:>9.2e}{row['mean_seconds_x0']:>8.3f}"
                  f"{row['proposals_per_s'] / 1e6:>9.1f}{row['proposals_per_cpu_s'] / 1e6:>8.1f}"
                  f"{batch['batch']:>6}{batch['proposals_per_s'] / 1e6:>9.1f}{batch['proposals_per_cpu_s'] / 1e6:>8.1f}"
                  f"{row['mean_gap_tabu_x0']:>10.2e}{row['mean_seconds_tabu_x0']:>7.2f}"
                  f"{row['mean_gap_sa_tabu']:>10.2e}{row['mean_seconds_sa_tabu']:>7.2f}",
                  flush=True)
    known = {s["seed"]: s["best"] for r in rows if r["family"] == "layerwise" and r["B"] == 256 for s in r["seeds"]}
    short_seeds = (0,) if args.quick else SHORT_RUN_BLOCKS
    for seed in short_seeds:
        if seed not in known:
            known[seed] = best_known(instances.layerwise_block(256, seed), args.quick)[0]
    problems = [instances.layerwise_block(256, seed) for seed in short_seeds]
    short = fastest_within(problems, [known[seed] for seed in short_seeds])
    print(f"\nB = 256 layer-wise, short runs from x0 ({len(short_seeds)} blocks × 4 seeds):")
    for entry in short:
        print(f"  {_short_label(entry)}: gap mean {entry['mean_gap']:.2e} worst {entry['worst_gap']:.2e}, "
              f"{entry['share_within']:4.0%} within 0.1 %, {entry['median_seconds'] * 1e3:6.1f} ms median "
              f"{entry['max_seconds'] * 1e3:6.1f} ms worst, {entry['median_cpu_seconds'] * 1e3:6.1f} CPU-ms median")
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"quick": args.quick, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average_at_start": load_at_start, "load_average": os.getloadavg(), "rows": rows,
              "b256_short_runs": short}
    path = OUT / ("solvers_short.json" if args.short_only else "solvers.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} (load average {load_at_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"on {os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
