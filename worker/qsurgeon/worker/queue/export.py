"""ExportingQueue: record every block a pruning run solves, to re-solve it elsewhere.

Like a dimod composite wraps a sampler, :class:`ExportingQueue` wraps any
:class:`~qsurgeon.worker.queue.Queue`: rounds go to the inner queue unchanged, and
every problem it carried is written as ``.npz`` (:meth:`BlockProblem.save_npz`) beside
the answer it got (``.solution.npz``), with one ``manifest.json`` entry per block. The
directory is then a self-contained benchmark of real pruning QUBOs:
``qsurgeon solve DIR --solver tabu`` re-solves every block and compares with the
answer the run used.

File names are a running number plus sanitised round and problem ids, never the raw
ids (which come from the engine or a request and could hold path separators).

At hardware scale a full export is large (every block of MiniLM at B = 128 is 27,648
problems, about 2 GB), so the queue can keep a sample: ``sample=N`` blocks of each round
(``per="round"``), or N blocks of each tensor over the run (``per="tensor"``: the first
rounds that hold a tensor fill its quota), drawn at random from a generator keyed by
(seed, job, round) so the same run exports the same blocks. The manifest says what was
sampled. Every round still goes to the inner queue whole.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.queue.base import Queue, RoundRequest, RoundResult
from qsurgeon.worker.solvers.shadow import block_identity

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "qsurgeon-blocks"
MANIFEST_VERSION = 1

SAMPLE_UNITS = ("round", "tensor")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _slug(text: str, limit: int = 40) -> str:
    return _UNSAFE.sub("-", text).strip("-.")[:limit] or "x"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json``; raises UsageError when it is missing or malformed."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{directory}: no {MANIFEST_NAME} (not a block export directory)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: not a readable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UsageError(f"{path}: not a qsurgeon block manifest (format must be {MANIFEST_FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise UsageError(f"{path}: manifest version {manifest.get('version')!r} is not supported")
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(entry, dict) and "file" in entry for entry in blocks):
        raise UsageError(f"{path}: 'blocks' must be a list of entries with a 'file'")
    return manifest


def block_file(directory: str | Path, name: Any) -> Path:
    """The path of a file named in a manifest, refusing anything outside the directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(f"manifest names an unsafe file {name!r} (plain file names inside the directory only)")
    path = Path(directory) / name
    if not path.is_file():
        raise UsageError(f"{path}: listed in the manifest but missing")
    return path


class ExportingQueue:
    """A Queue that delegates to ``inner`` and exports every block it carries to ``directory``.

    Other attributes (e.g. ``close``) are forwarded to the inner queue, so the composite
    can stand in for it anywhere. An existing export in the directory is extended.
    """

    def __init__(self, inner: Queue, directory: str | Path, *, sample: int | None = None, per: str = "round",
                 seed: int = 0) -> None:
        if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
            raise UsageError(f"export sample must be a positive number of blocks, got {sample!r}")
        if per not in SAMPLE_UNITS:
            raise UsageError(f"export sample per must be one of {', '.join(SAMPLE_UNITS)}, got {per!r}")
        self.inner = inner
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_NAME
        previous = read_manifest(self.directory) if manifest_path.exists() else {}
        self.entries: list[dict[str, Any]] = previous.get("blocks", [])
        self.sample, self.per, self.seed = sample, per, seed
        self.seen = int(previous.get("blocks_seen", len(self.entries)))
        self.taken: dict[str, int] = {}  # per tensor, with per="tensor"
        for entry in self.entries:
            tensor = entry.get("tensor") or ""
            self.taken[tensor] = self.taken.get(tensor, 0) + 1

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (e.g. during copying): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run_round(self, request: RoundRequest) -> RoundResult:
        result = self.inner.run_round(request)
        kept = self._sampled(request)
        for index in kept:
            problem, solution = request.problems[index], result.solutions[index]
            self.entries.append(self._export(request, problem, solution, result.failures.get(problem.id)))
        self.seen += len(request.problems)
        self._write_manifest()
        return result

    def _sampled(self, request: RoundRequest) -> list[int]:
        """Indices of the round's blocks to write, in order (all of them without a sample)."""
        count = len(request.problems)
        if self.sample is None:
            return list(range(count))
        key = zlib.crc32(repr(("export", int(self.seed), request.job_id, request.round_id)).encode())
        order = np.random.default_rng(key).permutation(count)
        if self.per == "round":
            return sorted(int(i) for i in order[:self.sample])
        chosen = []
        for index in order:
            tensor = block_identity(request.problems[int(index)].id)[0] or ""
            if self.taken.get(tensor, 0) < self.sample:
                self.taken[tensor] = self.taken.get(tensor, 0) + 1
                chosen.append(int(index))
        return sorted(chosen)

    def _export(
        self, request: RoundRequest, problem: BlockProblem, solution: BlockSolution | None, failure: str | None
    ) -> dict[str, Any]:
        stem = f"{len(self.entries):06d}_{_slug(request.round_id)}_{_slug(problem.id or 'block')}"
        problem_name = f"{stem}.npz"
        problem.save_npz(self.directory / problem_name)
        solution_name = None
        if solution is not None:
            solution_name = f"{stem}.solution.npz"
            solution.save_npz(self.directory / solution_name)
        tensor, row, block_round = block_identity(problem.id)
        return {
            "file": problem_name,
            "solution_file": solution_name,
            "job": request.job_id,
            "round": request.round_id,
            "problem_id": problem.id,
            "tensor": tensor,
            "row": row,
            "B": problem.num_variables,
            "k": problem.k,
            "groups": problem.num_groups,
            "factored": problem.is_factored,
            "solver": request.solver,
            "params": _json_safe(dict(request.params)),
            "current_energy": None if problem.x0 is None else problem.energy(problem.x0),
            "answer_energy": None if solution is None else solution.energy,
            "failure": failure if solution is None else None,
        }

    def _write_manifest(self) -> None:
        """The whole manifest, one block entry per line (compact: it is rewritten after every round)."""
        head = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "blocks_seen": self.seen,
                "sample": None if self.sample is None else {"n": self.sample, "per": self.per, "seed": self.seed}}
        entries = ",\n".join(json.dumps(entry, separators=(",", ":")) for entry in self.entries)
        text = json.dumps(head, separators=(",", ":"))[:-1] + ',"blocks":[\n' + entries + "\n]}\n"
        temporary = self.directory / f".{MANIFEST_NAME}.tmp"
        temporary.write_text(text)
        os.replace(temporary, self.directory / MANIFEST_NAME)  # readers never see half a manifest


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


__all__ = ["MANIFEST_NAME", "ExportingQueue", "block_file", "read_manifest"]
