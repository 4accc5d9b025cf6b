"""What a job runs: a prune job is the same ``run_prune`` as ``qsurgeon prune``, with a
RedisQueue; a solve job (a raw problem too large to answer at once) is one round of one
block. Also where a job's files are: its output folder, checkpoint and artifacts.

The request's options become a :class:`~qsurgeon.server.engine.run.PruneOptions`; the
fields that name server-side paths (model, calibration file, output and export folders)
are never taken from a request: the server fills them in from what it resolved itself.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import describe_error
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.queue.base import Queue, RoundRequest

OUTPUT_FOLDER = "output"
CHECKPOINT_FOLDER = "checkpoint"


def build_options(options: dict[str, Any], *, model_path: str, calibration: str, out_dir: Path):
    """A validated PruneOptions from a request's options (UsageError names the wrong option).

    The request's fields are JobOptions (every option but the server-owned paths); the
    preset, if any, fills the options the request left out; the server fills in the paths.
    """
    from qsurgeon.client.options import JobOptions, build_options as merge
    from qsurgeon.server.engine.options import check_engine_options

    try:
        request = JobOptions.model_validate(options)
    except ValidationError as error:
        raise UsageError(describe_error(error)) from None
    explicit = request.model_dump(exclude_unset=True)
    preset = explicit.pop("preset", None)
    values = {**explicit, "model": model_path, "calibration": calibration, "out": str(out_dir)}
    pruned = merge(values, preset)
    check_engine_options(pruned)
    return pruned


def jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (TypeError, ValueError):
        return str(value)


def run_prune_job(spec: dict[str, Any], job_dir: Path, *, queue: Queue,
                  progress: Callable[..., None]) -> tuple[dict[str, Any], list[str]]:
    """Run (or resume) one prune job; returns (metrics, artifact names)."""
    from qsurgeon.server.engine.checkpoint import DirectoryCheckpoint
    from qsurgeon.server.engine.run import run_prune

    out_dir = job_dir / OUTPUT_FOLDER
    _clear_partial_output(out_dir)
    options = build_options(spec["options"], model_path=spec["model_path"], calibration=spec["calibration"],
                            out_dir=out_dir)
    checkpoint = DirectoryCheckpoint(job_dir / CHECKPOINT_FOLDER)
    # Stopping aborts (the RedisQueue raises RoundAborted at the next round) instead of asking
    # the engine to wind down: a wound-down run would checkpoint its truncated blocks as
    # finished, and a resumed job would then differ from an uninterrupted one.
    result = run_prune(options, queue=queue, progress=progress, checkpoint=checkpoint, should_stop=None)
    return _metrics_of(result), list_artifacts(job_dir)


def _clear_partial_output(out_dir: Path) -> None:
    """A resumed job starts its output afresh; the checkpoint (a separate folder) carries the state."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _metrics_of(result: Any) -> dict[str, Any]:
    """The headline numbers of the run's report: summary, seconds per phase, iCBS counts."""
    report = getattr(result, "report", None)
    metrics: dict[str, Any] = {}
    if isinstance(report, dict):
        for key in ("summary", "seconds", "icbs"):
            if report.get(key) is not None:
                metrics[key] = jsonable(report[key])
    metrics["completed"] = bool(getattr(result, "completed", True))
    return metrics


def list_artifacts(job_dir: Path) -> list[str]:
    """Downloadable files: the top level of the job's output folder, plus solution.json."""
    names = []
    out_dir = job_dir / OUTPUT_FOLDER
    if out_dir.is_dir():
        names.extend(sorted(entry.name for entry in out_dir.iterdir() if entry.is_file()))
    if (job_dir / "solution.json").is_file():
        names.append("solution.json")
    return names


def artifact_path(job_dir: Path, name: str) -> Path | None:
    """The file behind an artifact name, or None; names are looked up, never joined blindly."""
    if name not in list_artifacts(job_dir):
        return None
    return job_dir / "solution.json" if name == "solution.json" else job_dir / OUTPUT_FOLDER / name


def run_solve_job(spec: dict[str, Any], job_dir: Path, *, queue: Queue,
                  progress: Callable[..., None]) -> tuple[dict[str, Any], list[str]]:
    """A large raw problem: one round of one block through the queue; the answer is saved."""
    problem = BlockProblem.load_npz(job_dir / "problem.npz")
    started = time.perf_counter()
    result = queue.run_round(RoundRequest(job_id=spec["job_id"], round_id="solve", problems=[problem],
                                          solver=spec["solver"], params=spec.get("params", {})))
    solution = result.solutions[0]
    if solution is None:
        raise UsageError(f"the problem could not be solved: {result.failures.get(problem.id, 'unknown reason')}")
    (job_dir / "solution.json").write_text(json.dumps(solution.to_dict()))
    progress({"fraction": 1.0, "energy": solution.energy, "blocks_solved": 1})
    return {"energy": solution.energy, "seconds": time.perf_counter() - started}, list_artifacts(job_dir)


def add_service_counts(job_dir: Path, counts: dict[str, int]) -> None:
    """Record what the queue did to the job's blocks (sent, failed, retried, dead-lettered,
    re-sent) in its ``report.json`` under ``service``, beside the engine's own counts."""
    report_path = job_dir / OUTPUT_FOLDER / "report.json"
    if not report_path.is_file():
        return
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return
    if isinstance(report, dict):
        report["service"] = {"blocks": dict(counts)}
        report_path.write_text(json.dumps(report, indent=2))
