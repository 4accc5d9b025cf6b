"""The example table of docs/quantum.md: every cloud backend on the SDKs' local testing devices.

Nothing here reaches a cloud service: D-Wave's QPU path runs on ``MockDWaveSampler``
(a 4×4 Chimera: cliques of up to 16 variables; its timing figures are the mock's fixed
demonstration values, not measurements), the hybrid path on dimod's ``ExactCQMSolver``,
IBM on ``FakeManilaV2`` (5 qubits, its noise model, on Aer) in qiskit-ibm-runtime's local
mode, Braket on its ``LocalSimulator``. Each answer is compared with the exact optimum
(exhaustive enumeration) and with ``sa``, the classical reference.

    python benchmarks/quantum_example.py            # prints a Markdown table
    python benchmarks/quantum_example.py --json benchmarks/out/quantum_example.json

What the table shows is how the machinery behaves (feasibility before repair, chain
breaks, what the metadata holds), not quantum advantage: blocks this small are solved
exactly by enumeration in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from qsurgeon.worker import BlockProblem, solve  # noqa: E402


def pruning_block(size: int, seed: int, groups_of: int | None = None) -> BlockProblem:
    """diag(w)·H·diag(w) with H a Gram matrix of activations (a layer-wise pruning block)."""
    rng = np.random.default_rng(seed)
    activations = rng.normal(size=(size, 3 * size)) * rng.uniform(0.2, 2.0, size=(size, 1))
    gram = activations @ activations.T / activations.shape[1]
    weights = rng.normal(size=size) * 0.05
    Q = weights[:, None] * gram * weights[None, :]
    Q[np.diag_indices(size)] += weights * (gram @ rng.normal(size=size) * 0.05)
    Q = (Q + Q.T) / 2
    if groups_of is None:
        return BlockProblem.dense(Q, k=size // 2, id=f"b{size}-s{seed}")
    labels = np.arange(size) // groups_of
    return BlockProblem.dense(Q, groups=labels, counts=np.full(labels.max() + 1, groups_of // 2),
                              id=f"b{size}-s{seed}-{groups_of // 2}:{groups_of}")


def backends() -> list[tuple[str, str, Any, list[int], dict[str, Any]]]:
    """(label, device, solver, block sizes, params) for every backend and its local device."""
    import dimod
    from braket.devices import LocalSimulator
    from dwave.system.testing import MockDWaveSampler
    from qiskit_ibm_runtime.fake_provider import FakeManilaV2

    from qsurgeon.worker.solvers.cloud.braket import BraketQAOASolver
    from qsurgeon.worker.solvers.cloud.dwave import DWaveHybridSolver, DWaveQPUSolver
    from qsurgeon.worker.solvers.cloud.ibm import IBMQAOASolver

    return [
        ("dwave-qpu", "MockDWaveSampler (Chimera 4x4)", DWaveQPUSolver(MockDWaveSampler()), [8, 16],
         {"num_reads": 100}),
        ("dwave-hybrid", "dimod ExactCQMSolver", DWaveHybridSolver(dimod.ExactCQMSolver()), [8, 12], {}),
        ("ibm-qaoa", "FakeManilaV2 (local mode, Aer)", IBMQAOASolver(FakeManilaV2()), [4, 5],
         {"shots": 1024, "reps": 1}),
        ("braket-qaoa", "Braket LocalSimulator (braket_sv)", BraketQAOASolver(LocalSimulator()), [6, 10],
         {"shots": 1000, "reps": 2}),
    ]


def row(label: str, device: str, problem: BlockProblem, answer: Any, optimum: float, sa: float) -> dict[str, Any]:
    meta = answer.metadata
    scale = max(abs(optimum), 1e-300)
    return {
        "backend": label, "device": device, "block": problem.id, "B": problem.num_variables,
        "constraint": f"k={int(problem.counts[0])}" if problem.num_groups == 1 else f"{problem.num_groups} groups",
        "energy": answer.energy, "optimum": optimum, "gap_pct": 100.0 * (answer.energy - optimum) / scale,
        "sa_gap_pct": 100.0 * (sa - optimum) / scale, "remote": meta.get("remote"),
        "raw_feasible_rate": meta.get("raw_feasible_rate"), "feasible_before_repair": meta.get("feasible_before_repair"),
        "repair_flips": meta.get("repair_flips"), "chain_break_fraction": meta.get("chain_break_fraction"),
        "qpu_access_time_us": meta.get("qpu_access_time_us"), "usage_seconds": meta.get("usage_seconds"),
        "task_duration_seconds": meta.get("task_duration_seconds"), "shots_or_reads": meta.get("reads"),
        "cost_estimate_usd": meta.get("cost_estimate_usd"), "wall_seconds": meta.get("wall_seconds"),
        "remote_task_id": meta.get("remote_task_id"), "metadata": meta,
    }


def fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | local device | B | constraint | gap to optimum | sa gap | feasible reads before repair "
             "| repair flips | chain breaks | device time | cost (USD) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["qpu_access_time_us"] is not None:
            device_time = f"QPU access {r['qpu_access_time_us'] / 1000:.2f} ms (mock)"
        elif r["usage_seconds"] is not None:
            device_time = f"usage {r['usage_seconds']} s"
        elif r["task_duration_seconds"] is not None:
            device_time = f"task {r['task_duration_seconds']:.3f} s"
        else:
            device_time = "–"
        lines.append(
            f"| {r['backend']} | {r['device']} | {r['B']} | {r['constraint']} | {r['gap_pct']:.2f} % | "
            f"{r['sa_gap_pct']:.2f} % | {fmt(r['raw_feasible_rate'], '.0%')} | {fmt(r['repair_flips'], 'd')} | "
            f"{fmt(r['chain_break_fraction'], '.3f')} | {device_time} | {fmt(r['cost_estimate_usd'], '.2f')} | "
            f"{r['wall_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every row, with full metadata, here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore", DeprecationWarning)  # qiskit-ibm-runtime's SamplerV2 notice
    rows = []
    started = time.perf_counter()
    for label, device, solver, sizes, params in backends():
        for size in sizes:
            groups = 4 if label == "dwave-hybrid" and size == 12 else None
            problem = pruning_block(size, args.seed + size, groups)
            optimum = solve(problem, "exhaustive").energy
            sa = solve(problem, "sa", seed=args.seed).energy
            answer = solve(problem, solver, seed=args.seed, **params)
            rows.append(row(label, device, problem, answer, optimum, sa))
    print(table(rows))
    print(f"\n{len(rows)} blocks in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
