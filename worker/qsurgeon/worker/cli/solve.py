"""CLI commands of the worker portion: ``qsurgeon solve`` and ``qsurgeon solvers``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import DEFAULT_SOLVER
from qsurgeon.worker.queue.export import block_file, read_manifest
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
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


def _solver_and_params(args: argparse.Namespace) -> tuple[str, dict]:
    """The solver ``qsurgeon solve`` runs: ``--solver`` itself, or with ``--reference`` or
    ``--route`` the shadow composite wrapping it (docs/quantum.md)."""
    params = _solver_params(args)
    if args.reference is None and args.route is None:
        return args.solver, params
    from qsurgeon.worker.solvers.shadow import shadow_params

    composite = shadow_params(args.solver, params, reference=args.reference, merge=args.merge, route=args.route,
                              seed=params.get("seed"))
    from qsurgeon.worker.solvers.registry import check_solver_params

    check_solver_params("shadow", composite)  # a bad route or reference is refused before any block
    return "shadow", composite


def _answer_tag(args: argparse.Namespace) -> str:
    """What names this configuration's answer files: the solver, or solver+reference with the
    merge and a hash of the route, so a resumed run only skips answers of the same setup."""
    if args.reference is None and args.route is None:
        return args.solver
    tag = f"{args.solver}+{args.reference or 'sa'}"
    if args.merge != "best":
        tag += f"-{args.merge}"
    if args.route:
        tag += f"-r{zlib.crc32(args.route.encode()):08x}"
    return tag


def _valid_answer(path: Path, entry: dict | None) -> BlockSolution | None:
    """The stored answer at ``path`` if it is whole and fits its block (size, ones), else None.

    An interrupted run leaves no half file (answers are written then renamed), but a file
    from elsewhere or a damaged one is solved again rather than trusted.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"])
            energy = float(data["energy"])
            solver = str(data["solver"])
            seconds = float(data["seconds"]) if "seconds" in data.files else 0.0
            metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if x.ndim != 1 or not np.isfinite(energy) or not ((x == 0) | (x == 1)).all():
        return None
    if entry is not None and (x.size != entry.get("B", x.size) or int(x.sum()) != entry.get("k", int(x.sum()))):
        return None
    return BlockSolution(x=x.astype(np.uint8), energy=energy, solver=solver, seconds=seconds,
                         metadata=metadata if isinstance(metadata, dict) else {})


def _save_atomically(solution: BlockSolution, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    solution.save_npz(temporary)
    os.replace(temporary, path)  # a reader (or a resumed run) never sees half an answer


class _Tally:
    """better / equal / worse of the new answers against stored energies (relative tolerance 1e-9)."""

    def __init__(self) -> None:
        self.better = self.equal = self.worse = 0

    def add(self, energy: float, stored: Any) -> None:
        if isinstance(stored, bool) or not isinstance(stored, (int, float)):
            return
        tolerance = 1e-9 * max(1.0, abs(stored))
        self.better += energy < stored - tolerance
        self.worse += energy > stored + tolerance
        self.equal += abs(energy - stored) <= tolerance

    def __bool__(self) -> bool:
        return bool(self.better + self.equal + self.worse)

    def text(self) -> str:
        return f"{self.better} better, {self.equal} equal, {self.worse} worse"


def run_solve(args: argparse.Namespace) -> int:
    """Solve FILEs and DIRs in chunks: bounded memory, each chunk's answers written as they come,
    blocks whose valid answer exists skipped (resumable), a progress bar, a summary."""
    from tqdm import tqdm

    from qsurgeon.worker.experiment import RECORD_FILE, RecordWriter, experiment_record
    from qsurgeon.worker.solve import solve_batch, solve_each_on_failure
    from qsurgeon.worker.solvers.registry import get_solver

    if args.chunk < 1:
        raise UsageError(f"--chunk must be at least 1, got {args.chunk}")
    files = _problem_files(args.files)
    solver, params = _solver_and_params(args)
    get_solver(solver)  # an unknown or uninstalled solver is refused before any block is read
    tag = _answer_tag(args)
    writer = None
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: not a directory")
        out.mkdir(parents=True, exist_ok=True)
        writer = RecordWriter(out / f".{RECORD_FILE}.partial", append=not args.fresh)
        if not args.fresh and (out / RECORD_FILE).is_file() and not writer.path.exists():
            os.replace(out / RECORD_FILE, writer.path)  # resume: earlier records stay, new ones append
    directory_mode = any(entry is not None for _, entry in files)
    each_line = not args.json and (args.verbose or not directory_mode)
    versus, reference_tally = _Tally(), _Tally()
    solved = skipped = 0
    failures: list[str] = []
    bar = tqdm(total=len(files), unit="block", file=sys.stderr, disable=args.quiet or len(files) < 2,
               mininterval=0.5 if sys.stderr.isatty() else 10.0, desc=tag, dynamic_ncols=True)
    try:
        for start in range(0, len(files), args.chunk):
            chunk = files[start:start + args.chunk]
            pending = []
            for path, entry in chunk:
                answer_path = solution_path(path) if entry is None else exported_solution_path(path, tag)
                stored = None if args.fresh else _valid_answer(answer_path, entry)
                if stored is not None:
                    skipped += 1
                    versus.add(stored.energy, None if entry is None else entry.get("answer_energy"))
                    reference = stored.metadata.get("shadow", {}).get("reference_energy") \
                        if isinstance(stored.metadata.get("shadow"), dict) else None
                    if reference is not None:
                        reference_tally.add(stored.energy, reference)
                else:
                    pending.append((path, entry, answer_path))
            bar.update(len(chunk) - len(pending))
            if not pending:
                continue
            problems = [BlockProblem.load_npz(path) for path, _, _ in pending]
            if len(files) == 1:  # one problem: its error is the command's (one line, exit 2)
                solutions, reasons = solve_batch(problems, solver, **params), [""]
            else:  # one bad block must not stop the others: it is reported and the rest go on
                solutions, reasons = solve_each_on_failure(problems, solver, params)
            records = []
            for (path, entry, answer_path), problem, solution, reason in zip(pending, problems, solutions, reasons):
                exported = None if entry is None else entry.get("answer_energy")
                if writer is not None:
                    records.append(experiment_record(problem, solution, round_id=str((entry or {}).get("round", "")),
                                                     job=str((entry or {}).get("job", "")), failure=reason or None,
                                                     stored_energy=exported))
                if solution is None:
                    failures.append(f"{path}: {reason}")
                    continue
                _save_atomically(solution, answer_path)
                solved += 1
                versus.add(solution.energy, exported)
                shadow = solution.metadata.get("shadow")
                if isinstance(shadow, dict) and shadow.get("reference_solver"):
                    quantum = shadow.get("quantum_energy")
                    if quantum is not None:
                        reference_tally.add(quantum, shadow.get("reference_energy"))
                if args.json:
                    record = {"file": str(path), **solution.to_dict()}
                    if entry is not None:
                        record["exported_answer_energy"] = exported
                        record["current_energy"] = entry.get("current_energy")
                    bar.clear()
                    print(json.dumps(record), flush=True)
                elif each_line:
                    against = f"  (exported answer {exported:.10g})" if isinstance(exported, (int, float)) else ""
                    bar.clear()
                    print(f"{path}: energy {solution.energy:.10g}{against}  ones {int(solution.x.sum())}/"
                          f"{solution.x.size}  {solution.solver} {solution.seconds:.3f}s -> {answer_path}")
            if writer is not None:
                writer.write(records)
            del problems, solutions
            bar.update(len(pending))
    except KeyboardInterrupt:
        bar.close()
        if writer is not None:
            writer.finish(Path(args.out) / RECORD_FILE)
        print(f"interrupted: {solved} blocks solved and written, {skipped} skipped; run the same command again "
              "to go on from here", file=sys.stderr)
        return 130
    bar.close()
    if writer is not None:
        writer.finish(Path(args.out) / RECORD_FILE)
    if args.json and skipped:  # stdout holds one JSON record per solved block; say why some have none
        print(f"{skipped} of {len(files)} blocks already answered (skipped; --fresh solves them again)", file=sys.stderr)
    if not args.json:
        print(f"{len(files)} blocks: {solved} solved, {skipped} already answered (skipped), {len(failures)} failed")
        if versus:
            print(f"{tag} vs exported answers: {versus.text()}")
        if reference_tally:
            print(f"{args.solver} vs reference {args.reference}: {reference_tally.text()}")
        if writer is not None:
            print(f"experiment record: {Path(args.out) / RECORD_FILE}")
    for failure in failures[:10]:
        print(f"failed: {failure}", file=sys.stderr)
    if len(failures) > 10:
        print(f"... and {len(failures) - 10} more failed blocks", file=sys.stderr)
    return 1 if failures else 0


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
    solve.add_argument("--solver", default=DEFAULT_SOLVER,
                       help=f"solver name (see `qsurgeon solvers`; default {DEFAULT_SOLVER}: one per block)")
    solve.add_argument("--restarts", type=int, help="independent restarts per problem")
    solve.add_argument("--sweeps", type=int, help="annealing sweeps per restart")
    solve.add_argument("--time-limit", type=float, help="seconds per batch, where the solver supports it")
    solve.add_argument("--seed", type=int, default=0)
    solve.add_argument("--param", action="append", metavar="NAME=VALUE",
                       help="any parameter the solver declares (see `qsurgeon solvers --json`); repeatable")
    solve.add_argument("--json", action="store_true", help="print one JSON object per problem")
    solve.add_argument("--reference", metavar="SOLVER",
                       help="also solve every block with this classical solver and merge the better answer (a shadow "
                            "run, docs/quantum.md)")
    solve.add_argument("--merge", choices=("best", "quantum"), default="best",
                       help="with --reference: best (the lower energy) or quantum (--solver's answer alone)")
    solve.add_argument("--route", metavar="RULE",
                       help="send to --solver only the blocks this rule takes (all, size<=N, tensor=GLOB, fraction=F; "
                            "comma-separated), the rest to --reference (or auto)")
    solve.add_argument("--out", metavar="DIR", help="write the experiment record (experiment.jsonl) into DIR")
    solve.add_argument("--chunk", type=int, default=256,
                       help="blocks read, solved and written together (bounds memory; default 256)")
    solve.add_argument("--fresh", action="store_true",
                       help="solve every block again, even those with a valid answer from an earlier run")
    solve.add_argument("--verbose", action="store_true", help="a line per block for directories too")
    solve.add_argument("--quiet", action="store_true", help="no progress bar")
    solve.set_defaults(func=run_solve)

    solvers = subparsers.add_parser("solvers", help="list solvers and their capabilities")
    solvers.add_argument("--json", action="store_true")
    solvers.set_defaults(func=run_solvers)
