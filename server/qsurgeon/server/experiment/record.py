"""The engine's side of an experiment: when a prune records one, where, and what an export will cost.

A prune records ``experiment.jsonl`` (one line per block, :mod:`qsurgeon.worker.experiment`)
when it is an experiment: a ``--reference`` or a ``--route`` was given, or the solver is a
remote (cloud) backend. While the run goes, records are appended to a file beside
``--out`` (``.NAME.experiment.jsonl.partial``: ``--out`` itself is written atomically at the
end, docs/prune.md); a resumed run appends to it, and the finished file keeps the last
record of each block. Every round's records are also emitted as one ``experiment`` event,
which a service job forwards to its event stream.

:func:`export_estimate` says, before anything is written, how many blocks and bytes
``--export-blocks`` will write: the schedule's rounds and block counts from the tensors'
shapes (docs/icbs.md §6), as many as ``--export-sample`` keeps.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from qsurgeon.client.options import PruneOptions
from qsurgeon.worker.experiment import RECORD_FILE, RecordingQueue, RecordWriter
from qsurgeon.worker.queue.base import Queue

#: npz container overhead per file (zip headers, the array headers, id and meta), measured on exports
NPZ_OVERHEAD = 1400


def is_experiment(options: PruneOptions) -> bool:
    """Whether a prune records its blocks: a shadow, a route, or a remote solver."""
    if options.method != "icbs":
        return False
    if options.reference is not None or options.route is not None:
        return True
    from qsurgeon.worker.solvers.registry import capabilities

    return bool(capabilities(options.solver).remote)


class PruneExperiment:
    """Records the blocks of one prune: wrap its queue, then :meth:`finish` into ``--out``."""

    def __init__(self, options: PruneOptions, emit: Callable[[dict[str, Any]], None], *, append: bool) -> None:
        self.writer = None
        if options.out is not None:
            out = Path(options.out).expanduser().absolute()
            self.writer = RecordWriter(out.parent / f".{out.name}.{RECORD_FILE}.partial", append=append)
        self.emit = emit
        self.queue: RecordingQueue | None = None

    def wrap(self, queue: Queue) -> RecordingQueue:
        self.queue = RecordingQueue(queue, self.writer, self.emit)
        return self.queue

    def summary(self) -> dict[str, Any]:
        """What report.json says about the record."""
        return {"file": RECORD_FILE if self.writer is not None else None,
                "records": 0 if self.queue is None else self.queue.records}

    def finish(self, out: Path | None) -> Path | None:
        if self.writer is None or out is None:
            return None
        return self.writer.finish(Path(out) / RECORD_FILE)


def prune_experiment(options: PruneOptions, emit: Callable[[dict[str, Any]], None], *,
                     append: bool = False) -> PruneExperiment | None:
    """The recorder of this prune, or None when it is not an experiment."""
    return PruneExperiment(options, emit, append=append) if is_experiment(options) else None


@dataclass(frozen=True)
class ExportEstimate:
    blocks: int  # blocks the run will solve
    rounds: int  # about how many rounds
    tensors: int
    written: int  # blocks the export keeps (all, or the sample)
    bytes: int

    def line(self, directory: str) -> str:
        from qsurgeon.server.engine.plan import format_bytes

        sampled = "" if self.written == self.blocks else f" (a sample of the {self.blocks:,} blocks)"
        return (f"--export-blocks {directory}: about {self.written:,} blocks{sampled} in about {self.rounds:,} "
                f"rounds, {2 * self.written + 1:,} files, {format_bytes(self.bytes)}")


def export_estimate(options: PruneOptions, targets_by_block: list[list[tuple[str, tuple[int, int]]]]) -> ExportEstimate:
    """How much ``--export-blocks`` writes for tensors of these shapes (per transformer block: name, (out, in))."""
    from qsurgeon.server.engine.icbs.schedule import ROUND_BYTES

    size = options.block_size
    limit = max(1, ROUND_BYTES // (4 * size * size))
    epochs = options.epochs if options.method == "icbs" else 0
    blocks = rounds = tensors = 0
    largest = 1
    for targets in targets_by_block:
        if not targets:
            continue
        tensors += len(targets)
        per_block, passes_max = 0, 1
        for _, (out, width) in targets:
            lines, length = (width, out) if options.granularity == "column" else (out, width)
            block = min(size, length)
            largest = max(largest, block)
            passes = max(1, int(round(options.coverage * length / block)))
            per_block += lines * passes
            passes_max = max(passes_max, passes)
        if options.steps_per_epoch is not None:
            per_block = options.steps_per_epoch
            round_count = math.ceil(per_block / len(targets)) if options.objective != "layerwise" else \
                max(1, math.ceil(per_block / limit))
        else:
            round_count = max(passes_max, math.ceil(per_block / limit))
        blocks += per_block * epochs
        rounds += round_count * epochs
    if options.export_sample is None:
        written = blocks
    elif options.export_sample_per == "tensor":
        written = min(blocks, options.export_sample * tensors)
    else:
        written = min(blocks, options.export_sample * rounds)
    if options.objective == "layerwise":
        matrix = 4 * largest * largest
    else:
        matrix = 4 * (options.samples + 1) * largest + (4 * largest * largest if "+" in options.objective else 0)
    per_block = matrix + largest + 2 * NPZ_OVERHEAD + largest  # problem (Q, x0) + its solution (x)
    return ExportEstimate(blocks=blocks, rounds=rounds, tensors=tensors, written=written, bytes=written * per_block)


def announce_export(options: PruneOptions, adapter: Any, stream: TextIO | None = None) -> ExportEstimate | None:
    """Print the export's estimated size, one line on stderr, before any block is written."""
    if options.export_blocks is None:
        return None
    shapes = [[(layer.parameter_name, tuple(layer.shape)) for layer in adapter.targets(index)]
              for index in range(len(adapter.blocks()))]
    estimate = export_estimate(options, shapes)
    print(estimate.line(options.export_blocks), file=stream or sys.stderr, flush=True)
    return estimate


__all__ = ["ExportEstimate", "PruneExperiment", "announce_export", "export_estimate", "is_experiment",
           "prune_experiment"]
