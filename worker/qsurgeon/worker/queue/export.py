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
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.queue.base import Queue, RoundRequest, RoundResult

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "qsurgeon-blocks"
MANIFEST_VERSION = 1

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

    def __init__(self, inner: Queue, directory: str | Path) -> None:
        self.inner = inner
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_NAME
        self.entries: list[dict[str, Any]] = read_manifest(self.directory)["blocks"] if manifest_path.exists() else []

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (e.g. during copying): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run_round(self, request: RoundRequest) -> RoundResult:
        result = self.inner.run_round(request)
        for problem, solution in zip(request.problems, result.solutions):
            self.entries.append(self._export(request, problem, solution, result.failures.get(problem.id)))
        self._write_manifest()
        return result

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
        return {
            "file": problem_name,
            "solution_file": solution_name,
            "job": request.job_id,
            "round": request.round_id,
            "problem_id": problem.id,
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
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "blocks": self.entries}
        temporary = self.directory / f".{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, self.directory / MANIFEST_NAME)  # readers never see half a manifest


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


__all__ = ["MANIFEST_NAME", "ExportingQueue", "block_file", "read_manifest"]
