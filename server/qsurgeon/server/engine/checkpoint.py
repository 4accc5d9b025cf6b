"""Where a prune run keeps its resumable state, and the codec that puts that state in one file.

:func:`~qsurgeon.server.engine.run.run_prune` saves a checkpoint after every iCBS round
and every transformer block; a resumed run reads it back and continues (docs/prune.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from qsurgeon.client.errors import UsageError


class Checkpoint(Protocol):
    """Where a run keeps its resumable state: ``load()`` gives the last ``save(state)`` or None."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class DirectoryCheckpoint:
    """A checkpoint in a folder: tensors in ``state.safetensors``, the rest as JSON in its metadata.

    One file, replaced atomically (write then ``os.replace``), so a crash mid-save leaves
    the previous checkpoint intact. State values may nest dicts and lists; tensors
    anywhere in them are stored as safetensors entries.
    """

    FILE = "state.safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _extract_tensors(state, "", tensors)
        partial = self.path / f".{self.FILE}.partial"
        save_file(tensors, str(partial), metadata={"state": json.dumps(skeleton)})
        os.replace(partial, self.path / self.FILE)

    def load(self) -> dict[str, Any] | None:
        from safetensors import safe_open

        file = self.path / self.FILE
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as handle:
                skeleton = json.loads(handle.metadata()["state"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # a corrupt or foreign file: say so instead of resuming wrongly
            raise UsageError(f"cannot read checkpoint {str(file)!r}: {error}") from None
        return _insert_tensors(skeleton, tensors)


def _extract_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` (keyed by its path) and replaced by a reference."""
    if isinstance(value, torch.Tensor):
        key = path or "tensor"
        tensors[key] = value.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {str(k): _extract_tensors(v, f"{path}/{k}" if path else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _insert_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_extract_tensors`: references replaced by their tensors."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _insert_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_insert_tensors(v, tensors) for v in value]
    return value


__all__ = ["Checkpoint", "DirectoryCheckpoint"]
