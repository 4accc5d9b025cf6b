"""CLI commands of the worker portion: ``qsurgeon solve`` and ``qsurgeon solvers``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.problem import BlockProblem
from qsurgeon.worker.solve import solve_batch
from qsurgeon.worker.solvers.registry import all_capabilities


def solution_path(problem_path: Path) -> Path:
    """Where the answer to ``block.npz`` is written: ``block.solution.npz`` beside it."""
    return problem_path.with_name(problem_path.name.removesuffix(".npz") + ".solution.npz")


def _solver_params(args: argparse.Namespace) -> dict:
    params = {"seed": args.seed}
    if args.restarts is not None:
        params["restarts"] = args.restarts
    if args.sweeps is not None:
        params["sweeps"] = args.sweeps
    if args.time_limit is not None:
        params["time_limit"] = args.time_limit
    return params


def run_solve(args: argparse.Namespace) -> int:
    paths = [Path(name) for name in args.files]
    problems = []
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        problems.append(BlockProblem.load_npz(path))
    solutions = solve_batch(problems, args.solver, **_solver_params(args))
    for path, solution in zip(paths, solutions):
        solution.save_npz(solution_path(path))
        if args.json:
            print(json.dumps({"file": str(path), **solution.to_dict()}))
        else:
            print(f"{path}: energy {solution.energy:.10g}  ones {int(solution.x.sum())}/{solution.x.size}  "
                  f"{solution.solver} {solution.seconds:.3f}s -> {solution_path(path)}")
    return 0


def run_solvers(args: argparse.Namespace) -> int:
    capabilities = all_capabilities()
    if args.json:
        print(json.dumps([c.to_dict() for c in capabilities], indent=2))
        return 0
    header = f"{'name':<12} {'installed':<9} {'max vars':>8}  {'constraints':<11} {'device':<10} description"
    print(header)
    for c in capabilities:
        installed = "yes" if c.installed else f"no [{c.extra}]"
        print(f"{c.name:<12} {installed:<9} {c.max_variables:>8}  {c.constraints:<11} {c.device:<10} {c.description}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    solve = subparsers.add_parser("solve", help="solve block problems stored as .npz files")
    solve.add_argument("files", nargs="+", metavar="FILE.npz")
    solve.add_argument("--solver", default="sa", help="solver name (see `qsurgeon solvers`)")
    solve.add_argument("--restarts", type=int, help="independent restarts per problem")
    solve.add_argument("--sweeps", type=int, help="annealing sweeps per restart")
    solve.add_argument("--time-limit", type=float, help="seconds per batch, where the solver supports it")
    solve.add_argument("--seed", type=int, default=0)
    solve.add_argument("--json", action="store_true", help="print one JSON object per problem")
    solve.set_defaults(func=run_solve)

    solvers = subparsers.add_parser("solvers", help="list solvers and their capabilities")
    solvers.add_argument("--json", action="store_true")
    solvers.set_defaults(func=run_solvers)
