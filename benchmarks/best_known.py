"""Best-known energies of the benchmark instances, cached in benchmarks/best_known.json.

For every family of ``instances.FAMILIES`` and B ∈ SIZES (seeds per size in SEEDS), the best
known energy (offset included) is the lowest of:

- the exhaustive optimum (B ≤ 16);
- greedy construction + best-swap descent (``solvers/greedy.py``), and the descent from x0;
- long ``sa`` runs from the greedy start and from random starts (each answer then descended);
- a long ``swap-tabu`` run (from the greedy start; at B > 256 from the long ``sa`` answer);
- at B > 256, ``swap-tabu`` after a long anneal (2 × 64,000 ``sa`` sweeps at B ≤ 1024, 2 × 16,000
  above; 180 s limit): at these sizes the anneal's length is what lowers the energy;
- long D-Wave ``neal`` and ``tabu`` runs (B ≤ 256; penalty + repair);
- on blocks with small groups (N:M), long heat-bath annealing over whole groups from the
  greedy start (``group_descent.group_anneal``, 16 × 3000 sweeps, B ≤ 1024; :func:`group_candidates`);
- any later benchmark run that went lower (``record`` merges it, with its source).

The JSON maps an instance id (``family-B-seed``) to {"energy", "by", "candidates"}; rerun
to extend it (instances already present are skipped unless --redo).

    .venv/bin/python benchmarks/best_known.py [--sizes 16,64,256] [--families outlier,nm] [--redo]
    .venv/bin/python benchmarks/best_known.py --families nm --sizes 64,256 --only-group   # add just those
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import numpy as np  # noqa: E402

from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402
from qsurgeon.worker.solve import solve  # noqa: E402
from qsurgeon.worker.solvers import group_descent  # noqa: E402
from qsurgeon.worker.solvers.greedy import descend, greedy_start, swap_deltas  # noqa: E402
from qsurgeon.worker.solvers.sa import GREEDY_SCALE_QUANTILE, robust_scale  # noqa: E402

PATH = HERE / "best_known.json"
SIZES = (16, 64, 256, 1024, 4096)
#: seeds (instances) per block size: fewer where long runs cost minutes
SEEDS = {16: (0, 1, 2), 64: (0, 1, 2), 256: (0, 1, 2), 1024: (0, 1), 4096: (0,)}


def load_instances():
    spec = importlib.util.spec_from_file_location("qsurgeon_bench_instances", HERE / "instances.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instance_id(family: str, size: int, seed: int) -> str:
    return f"{family}-{size}-{seed}"


def load() -> dict[str, Any]:
    return json.loads(PATH.read_text()) if PATH.is_file() else {}


def save(table: dict[str, Any]) -> None:
    PATH.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")


def record(table: dict[str, Any], key: str, energy: float, by: str) -> bool:
    """Merge a run's energy into the table; True when it lowered the best known."""
    entry = table.setdefault(key, {"energy": float("inf"), "by": "", "candidates": {}})
    previous = entry["candidates"].get(by)
    entry["candidates"][by] = energy if previous is None else min(previous, energy)
    if energy < entry["energy"]:
        entry["energy"], entry["by"] = float(energy), by
        return True
    return False


def candidates(problem: BlockProblem) -> dict[str, float]:
    """Energies of every reference method on one instance (see the module docstring)."""
    size = problem.num_variables
    found: dict[str, float] = {}

    def add(name: str, x: np.ndarray) -> None:
        found[name] = problem.energy(x)

    if size <= 16:
        found["exhaustive"] = solve(problem, "exhaustive").energy
    x_greedy = greedy_start(problem)
    add("greedy+descent", x_greedy)
    if problem.x0 is not None and size <= 1024:
        add("x0+descent", descend(problem, problem.x0))
    limit = 60.0 if size >= 1024 else None
    sweeps = 20000 if size <= 256 else 5000 if size <= 1024 else 1000
    restarts = 16 if size <= 256 else 8 if size <= 1024 else 4
    long_runs = []
    for start in ("greedy", "random"):
        extra = {"time_limit": limit} if limit else {}
        answer = solve(problem, "sa", seed=12345, restarts=restarts, sweeps=sweeps, start=start, **extra)
        long_runs.append(answer)
        found[f"sa-long-{start}"] = answer.energy
        if size <= 1024:
            add(f"sa-long-{start}+descent", descend(problem, answer.x))
    if size <= 4096:
        if size <= 256:
            tabu = solve(problem, "swap-tabu", seed=12345, restarts=4, iterations=20000, start="greedy")
        else:
            best = min(long_runs, key=lambda answer: answer.energy)
            tabu = solve(problem.with_x0(best.x), "swap-tabu", seed=12345, restarts=2, anneal_sweeps=0,
                         iterations=5000 if size <= 1024 else 400, time_limit=60.0)
        found["swap-tabu-long"] = tabu.energy
    if 256 < size <= 4096:  # at B ≥ 1024 the anneal's length is what lowers the energy (anneal_first.py)
        found["swap-tabu-anneal-long"] = solve(problem, "swap-tabu", seed=12345, restarts=2, time_limit=180.0,
                                               anneal_sweeps=64000 if size <= 1024 else 16000).energy
    found.update(group_candidates(problem))
    if size <= 256:
        for name, params in (("neal", {"restarts": 64, "sweeps": 10000}), ("tabu", {"restarts": 8, "time_limit": 8.0})):
            try:
                found[f"{name}-long"] = solve(problem, name, seed=12345, **params).energy
            except Exception as error:  # an optional backend missing must not stop the table
                print(f"  {name}: {error}", flush=True)
    return found


def group_candidates(problem: BlockProblem, restarts: int = 16, sweeps: int = 3000) -> dict[str, float]:
    """Group-move references on blocks with small groups (B ≤ 1024): heat-bath group annealing
    from the greedy start (β_rel 2 → 100 on the 0.25 quantile of |ΔE| there, as ``sa``), best of
    ``restarts`` keys 0.. (each run ends with group descent). Empty where no group is small."""
    if problem.num_variables > 1024 or not group_descent.applies(problem):
        return {}
    start = greedy_start(problem)
    scale = robust_scale(swap_deltas(problem, start), GREEDY_SCALE_QUANTILE)
    energies = [problem.energy(group_descent.group_anneal(problem, start, key, sweeps, (2.0, 100.0), scale))
                for key in range(restarts)]
    return {"group-anneal-long": min(energies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--families", default="")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--only-group", action="store_true",
                        help="compute only group_candidates and merge them into the entries present")
    args = parser.parse_args()
    instances = load_instances()
    families = [name for name in args.families.split(",") if name] or list(instances.FAMILIES)
    table = load()
    for size in (int(value) for value in args.sizes.split(",")):
        for family in families:
            for seed in SEEDS[size]:
                key = instance_id(family, size, seed)
                if key in table and not (args.redo or args.only_group):
                    continue
                problem = instances.FAMILIES[family](size, seed)
                started = time.perf_counter()
                found = group_candidates(problem) if args.only_group else candidates(problem)
                for by, energy in found.items():
                    record(table, key, energy, by)
                save(table)
                entry = table[key]
                print(f"{key:<20} best {entry['energy']:.6e} by {entry['by']:<22} "
                      f"({time.perf_counter() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
