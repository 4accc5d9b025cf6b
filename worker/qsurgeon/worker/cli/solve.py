"""CLI commands of the worker portion: ``qsurgeon solve`` and ``qsurgeon solvers``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.queue.export import block_file, read_manifest
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solve import solve_batch
from qsurgeon.worker.solvers.registry import all_capabilities, solver_parameters


def solution_path(problem_path: Path) -> Path:
    """Where the answer to ``block.npz`` is written: ``block.solution.npz`` beside it."""
    return problem_path.with_name(problem_path.name.removesuffix(".npz") + ".solution.npz")


def _solver_params(args: argparse.Namespace) -> dict:
    """The shortcut options plus every ``--param NAME=VALUE``, parsed by the solver's declaration."""
    params = {"seed": args.seed}
    if args.restarts is not None:
        params["restarts"] = args.restarts
    if args.sweeps is not None:
        params["sweeps"] = args.sweeps
    if args.time_limit is not None:
        params["time_limit"] = args.time_limit
    if args.param:
        declared = {param.name: param for param in solver_parameters(args.solver)}
        for item in args.param:
            name, equals, text = item.partition("=")
            if not equals or name not in declared:
                raise UsageError(f"--param {item!r}: give NAME=VALUE with NAME one of "
                                 f"{', '.join(sorted(declared))} (solver {args.solver!r})")
            params[name] = declared[name].parse(text, args.solver)
    return params


def _problem_files(names: list[str]) -> list[tuple[Path, dict | None]]:
    """(problem file, its manifest entry or None) for every FILE or DIR argument.

    A directory with a manifest.json (written by ExportingQueue) stands for every block
    listed in it.
    """
    files: list[tuple[Path, dict | None]] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            files.extend((block_file(path, entry["file"]), entry) for entry in read_manifest(path)["blocks"])
        elif path.is_file():
            files.append((path, None))
        else:
            raise UsageError(f"{path}: no such file or directory")
    return files


def exported_solution_path(problem_path: Path, solver: str) -> Path:
    """Where the answer to an exported block goes: ``NAME.<solver>.solution.npz``, so the
    answer the pruning run used (``NAME.solution.npz``) is kept for comparison."""
    tag = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in solver) or "solver"
    return problem_path.with_name(problem_path.name.removesuffix(".npz") + f".{tag}.solution.npz")


def run_solve(args: argparse.Namespace) -> int:
    files = _problem_files(args.files)
    problems = [BlockProblem.load_npz(path) for path, _ in files]
    solutions = solve_batch(problems, args.solver, **_solver_params(args))
    better = equal = worse = 0
    for (path, entry), solution in zip(files, solutions):
        answer_path = solution_path(path) if entry is None else exported_solution_path(path, args.solver)
        solution.save_npz(answer_path)
        exported = None if entry is None else entry.get("answer_energy")
        if isinstance(exported, (int, float)):
            tolerance = 1e-9 * max(1.0, abs(exported))
            better += solution.energy < exported - tolerance
            worse += solution.energy > exported + tolerance
            equal += abs(solution.energy - exported) <= tolerance
        if args.json:
            record = {"file": str(path), **solution.to_dict()}
            if entry is not None:
                record["exported_answer_energy"] = exported
                record["current_energy"] = entry.get("current_energy")
            print(json.dumps(record))
        else:
            versus = f"  (exported answer {exported:.10g})" if isinstance(exported, (int, float)) else ""
            print(f"{path}: energy {solution.energy:.10g}{versus}  ones {int(solution.x.sum())}/{solution.x.size}  "
                  f"{solution.solver} {solution.seconds:.3f}s -> {answer_path}")
    if better + equal + worse and not args.json:
        print(f"{args.solver} vs exported answers: {better} better, {equal} equal, {worse} worse")
    return 0


def run_solvers(args: argparse.Namespace) -> int:
    capabilities = all_capabilities()
    if args.json:
        records = []
        for c in capabilities:
            declared = solver_parameters(c.name) if c.installed else ()
            records.append({**c.to_dict(), "parameters": [param.to_dict() for param in declared]})
        print(json.dumps(records, indent=2))
        return 0
    header = f"{'name':<12} {'installed':<9} {'max vars':>8}  {'constraints':<11} {'device':<10} description"
    print(header)
    for c in capabilities:
        installed = "yes" if c.installed else f"no [{c.extra}]"
        print(f"{c.name:<12} {installed:<9} {c.max_variables:>8}  {c.constraints:<11} {c.device:<10} {c.description}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    solve = subparsers.add_parser(
        "solve", help="solve block problems stored as .npz files or exported directories (with manifest.json)"
    )
    solve.add_argument("files", nargs="+", metavar="FILE.npz|DIR")
    solve.add_argument("--solver", default="sa", help="solver name (see `qsurgeon solvers`)")
    solve.add_argument("--restarts", type=int, help="independent restarts per problem")
    solve.add_argument("--sweeps", type=int, help="annealing sweeps per restart")
    solve.add_argument("--time-limit", type=float, help="seconds per batch, where the solver supports it")
    solve.add_argument("--seed", type=int, default=0)
    solve.add_argument("--param", action="append", metavar="NAME=VALUE",
                       help="any parameter the solver declares (see `qsurgeon solvers --json`); repeatable")
    solve.add_argument("--json", action="store_true", help="print one JSON object per problem")
    solve.set_defaults(func=run_solve)

    solvers = subparsers.add_parser("solvers", help="list solvers and their capabilities")
    solvers.add_argument("--json", action="store_true")
    solvers.set_defaults(func=run_solvers)
