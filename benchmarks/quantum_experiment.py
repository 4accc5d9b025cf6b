"""The example shadow experiment of docs/quantum.md, on D-Wave's local mock QPU.

Why: docs/quantum.md shows what ``qsurgeon experiment report`` makes of a shadow/routed
run. Without a Leap account, the run uses ``MockDWaveSampler`` (dwave-system's testing
sampler: a Chimera graph whose largest clique is 16, answered by classical simulated
annealing, with fixed demonstration timing) registered under the name ``dwave-qpu``,
so the prune is exactly the command a user runs against Leap:

    qsurgeon prune builtin:minilm --include '*layer.0.attention.self.query*' --block-size 16 \\
        --solver dwave-qpu --solver-param num_reads=50 --solver-param price_per_second=PRICE \\
        --reference sa --route fraction=0.05 --out OUT

Then a classical-only run of the same seed, and the report with both. ``PRICE`` is an
assumed rate for the illustration of the cost plots (``--price``), not a quote: on Leap,
use your plan's. The PNG files go to ``docs/`` (``--docs``) and the tables are printed.

    python benchmarks/quantum_experiment.py --work /tmp/quantum-experiment --docs docs
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "quantum_experiment")
    parser.add_argument("--docs", type=Path, default=None, help="copy the plots here as quantum_experiment_*.png")
    parser.add_argument("--include", default="*layer.0.attention.self.query*")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--route", default="fraction=0.05")
    parser.add_argument("--price", type=float, default=1.0, help="assumed US dollars per QPU second (illustration)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from dwave.system.testing import MockDWaveSampler

    from qsurgeon.client.options import PruneOptions
    from qsurgeon.server.engine.run import run_prune
    from qsurgeon.server.experiment.report import PLOTS, experiment_report
    from qsurgeon.worker.solvers.cloud.dwave import DWaveQPUSolver
    from qsurgeon.worker.solvers.registry import register

    register(DWaveQPUSolver(MockDWaveSampler(), name="dwave-qpu"))  # the mock answers under the real name
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    common = dict(model="builtin:minilm", include=[args.include], block_size=args.block_size, samples=64,
                  seq_len=64, seed=args.seed)
    started = time.perf_counter()
    run_prune(PruneOptions(**common, out=str(args.work / "shadow"), solver="dwave-qpu",
                           solver_params={"num_reads": 50, "price_per_second": args.price},
                           reference="sa", route=args.route))
    shadow_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run_prune(PruneOptions(**common, out=str(args.work / "classical"), solver="sa"))
    classical_seconds = time.perf_counter() - started
    result = experiment_report(args.work / "shadow", classical=args.work / "classical", out=args.work / "report")
    print(result["tables"])
    print(f"\nshadow run {shadow_seconds:.0f} s, classical run {classical_seconds:.0f} s (wall, this machine)")
    if args.docs is not None:
        for name in PLOTS:
            source = args.work / "report" / name
            if source.is_file():
                target = args.docs / f"quantum_experiment_{name}"
                shutil.copyfile(source, target)
                print(f"plot: {target}")


if __name__ == "__main__":
    sys.exit(main())
