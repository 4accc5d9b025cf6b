"""The experiment record: one JSON line per block, saying what the quantum backend bought.

Built from a block and its checked answer (plain, or from the ``shadow`` composite), so the
same record comes out of ``qsurgeon prune`` (``experiment.jsonl`` in ``--out``), a service
job (an artifact, and ``experiment`` events on the job's stream) and ``qsurgeon solve``
(``--out DIR``). ``qsurgeon experiment report`` reads it.

A record holds (``None`` where a backend does not say): the block's identity (``tensor``,
``row``, ``round``, ``problem_id``, ``job``, ``request_round``), its size ``B``, ``k`` and
``counts``, the ``route`` it took and why, the ``backend`` that answered (a cloud backend
past its budget answers with its fallback: ``backend`` is then e.g. ``sa`` and
``fallback_reason`` says why), its ``energy``, the ``reference`` solver's energy and the
``gap`` to it, the ``current_energy`` (the block's assignment before the round), the
``merged_energy`` actually returned and which answer was ``chosen``, the fraction of reads
feasible before repair, ``repair_flips``, the backend's own ``timing`` fields,
``chain_break_fraction``, ``remote_task_id``, ``cost_usd``, ``qpu_seconds`` and the
``wall_seconds`` of the backend's answer and of the reference's.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.queue.base import Queue, RoundRequest, RoundResult
from qsurgeon.worker.solvers.shadow import block_identity

RECORD_FILE = "experiment.jsonl"
#: metadata fields that are a backend's own timing (docs/quantum.md, "What each answer's metadata holds")
TIMING_FIELDS = (
    "timing_us", "qpu_access_time_us", "qpu_programming_time_us", "qpu_sampling_time_us", "run_time_us",
    "charge_time_us", "usage_seconds", "timestamps", "task_duration_seconds",
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def relative_gap(energy: float | None, reference: float | None) -> float | None:
    """(E − E_ref) / |E_ref|: positive when the backend's answer is worse than the reference's."""
    if energy is None or reference is None:
        return None
    return (energy - reference) / max(abs(reference), 1e-300)


def experiment_record(problem: BlockProblem, solution: BlockSolution | None, *, round_id: str = "",
                      job: str = "", failure: str | None = None, stored_energy: float | None = None,
                      wall_seconds: float | None = None) -> dict[str, Any]:
    """One line of ``experiment.jsonl`` for ``problem`` and its answer (None: it failed)."""
    tensor, row, block_round = block_identity(problem.id)
    record: dict[str, Any] = {
        "job": job, "request_round": round_id, "problem_id": problem.id, "tensor": tensor, "row": row,
        "round": block_round, "B": problem.num_variables, "k": int(problem.counts.sum()),
        "groups": problem.num_groups, "counts": problem.counts.astype(int).tolist() if problem.num_groups > 1 else None,
        "current_energy": None if problem.x0 is None else problem.energy(problem.x0),
        "stored_energy": stored_energy,
    }
    if solution is None:
        return {**record, "backend": None, "failure": failure or "no answer", "energy": None}
    metadata = dict(solution.metadata)
    shadow = metadata.pop("shadow", None)
    if shadow:
        routed = shadow.get("route") == "quantum" and shadow.get("quantum_energy") is not None
        if routed:  # the quantum answer's metadata: top level when it was the one returned
            backend_meta = shadow.get("quantum_metadata") or (metadata if shadow.get("chosen") == "quantum" else {})
            backend, energy = shadow.get("quantum_answered_by"), shadow.get("quantum_energy")
            seconds = shadow.get("quantum_seconds")
        else:  # kept off the quantum solver (or it failed): the classical answer is the block's
            backend_meta = metadata
            backend, energy = shadow.get("classical_solver"), shadow.get("reference_energy")
            seconds = shadow.get("reference_seconds")
        reference_energy = shadow.get("reference_energy") if shadow.get("reference_solver") else None
        record.update({
            "route": shadow.get("route"), "route_reason": shadow.get("route_reason"),
            "requested_backend": shadow.get("quantum_solver"), "backend": backend, "energy": energy,
            "reference": shadow.get("reference_solver"), "reference_energy": reference_energy,
            "reference_seconds": shadow.get("reference_seconds") if shadow.get("reference_solver") else None,
            "merged_energy": solution.energy, "chosen": shadow.get("chosen"), "merge": shadow.get("merge"),
            "quantum_failure": shadow.get("quantum_failure"),
        })
    else:
        backend_meta, seconds = metadata, solution.seconds
        record.update({
            "route": "quantum" if metadata.get("remote") else "solver", "route_reason": None,
            "requested_backend": metadata.get("requested_solver", solution.solver), "backend": solution.solver,
            "energy": solution.energy, "reference": None, "reference_energy": None, "reference_seconds": None,
            "merged_energy": solution.energy, "chosen": "solver", "merge": None, "quantum_failure": None,
        })
    energy = record["energy"]
    record["gap"] = relative_gap(energy, record["reference_energy"])
    record["gap_abs"] = None if energy is None or record["reference_energy"] is None else \
        energy - record["reference_energy"]
    record["stored_gap"] = relative_gap(energy, stored_energy)
    timing = {name: backend_meta[name] for name in TIMING_FIELDS if backend_meta.get(name) is not None}
    wall = _number(backend_meta.get("wall_seconds"))
    record.update({
        "remote": bool(backend_meta.get("remote", False)),
        "feasible_before_repair": backend_meta.get("feasible_before_repair"),
        "feasible_before_repair_fraction": _number(backend_meta.get("raw_feasible_rate")),
        "repair_flips": backend_meta.get("repair_flips"),
        "timing": timing or None,
        "chain_break_fraction": _number(backend_meta.get("chain_break_fraction")),
        "remote_task_id": backend_meta.get("remote_task_id"),
        "cost_usd": _number(backend_meta.get("cost_estimate_usd")),
        "qpu_seconds": _number(backend_meta.get("qpu_seconds")),
        "fallback_reason": backend_meta.get("fallback_reason"),
        "wall_seconds": wall if wall is not None else _number(seconds),
        "round_wall_seconds": wall_seconds,
        "failure": None,
    })
    return _json_safe(record)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class RecordWriter:
    """Appends records to a JSON-lines file as they come (a crash keeps what was written);
    :meth:`finish` writes the deduplicated file (last record of each block wins: a resumed
    run solves again the rounds after its checkpoint) atomically to its destination."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()
        self.count = 0

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        if lines:
            with open(self.path, "a") as handle:
                handle.write(lines)
                handle.flush()
            self.count += lines.count("\n")

    def finish(self, destination: str | Path) -> Path:
        destination = Path(destination)
        records = read_records(self.path) if self.path.exists() else []
        latest: dict[tuple[Any, Any], dict[str, Any]] = {}
        for position, record in enumerate(records):
            key = (record.get("job"), record.get("problem_id")) if record.get("problem_id") else ("#", position)
            latest.pop(key, None)  # keep the order of the last occurrence
            latest[key] = record
        temporary = destination.with_name(f".{destination.name}.tmp")
        temporary.write_text("".join(json.dumps(record, separators=(",", ":")) + "\n" for record in latest.values()))
        os.replace(temporary, destination)
        if self.path.exists() and self.path.resolve() != destination.resolve():
            self.path.unlink()
        return destination


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file; a torn last line (an interrupted write) is skipped."""
    records = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class RecordingQueue:
    """A Queue composite that records every block of every round it carries.

    ``writer`` receives the records of each round; ``emit`` (the engine's progress sink)
    gets one ``{"event": "experiment", "request_round": ..., "records": [...]}`` per round, so a
    service job's event stream carries the same records (one event per round keeps the
    stream's length bounded by rounds, not blocks).
    """

    def __init__(self, inner: Queue, writer: RecordWriter | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.inner = inner
        self.writer = writer
        self.emit = emit
        self.records = 0

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run_round(self, request: RoundRequest) -> RoundResult:
        started = time.perf_counter()
        result = self.inner.run_round(request)
        wall = time.perf_counter() - started
        records = [
            experiment_record(problem, solution, round_id=request.round_id, job=request.job_id,
                              failure=result.failures.get(problem.id), wall_seconds=wall)
            for problem, solution in zip(request.problems, result.solutions)
        ]
        if self.writer is not None:
            self.writer.write(records)
        self.records += len(records)
        if self.emit is not None:
            self.emit({"event": "experiment", "request_round": request.round_id, "records": records})
        return result


__all__ = ["RECORD_FILE", "RecordWriter", "RecordingQueue", "experiment_record", "read_records", "relative_gap"]
