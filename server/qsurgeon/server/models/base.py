"""What the pruning pipeline needs to know about any model, and nothing more.

The pipeline is model-agnostic: it asks a :class:`ModelAdapter` for the transformer blocks
(the units it captures inputs for and prunes one after another), for the prunable tensors
of each block, for a way to feed calibration data up to block 0, and for a way to save
the result. This module holds that contract and the architecture-free discovery of
blocks and prunable linears; the text adapters live in :mod:`.text`, the image adapter in
:mod:`.vision`, and choosing one for a model reference in :mod:`.loading`. It imports
none of them, so every adapter module can build on it without an import cycle.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from qsurgeon.client.errors import UsageError

#: parameter-name patterns left out of pruning unless the user overrides ``exclude``
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)

class StopForward(Exception):
    """Raised by the block-0 hook: the rest of the model need not run during capture."""


@dataclass
class TargetLayer:
    """One prunable weight tensor, seen as (out, in) whatever its module stores.

    GPT-2's ``Conv1D`` keeps its weight as (in, out); :meth:`weight` returns a transposed
    *view*, so writing through it writes the real parameter.
    """

    name: str  # module name in the whole model, e.g. "encoder.layer.0.attention.self.query"
    module: nn.Module
    transposed: bool = False

    @property
    def parameter_name(self) -> str:
        """Key of masks and reports: the parameter's name in the model's state dict."""
        return f"{self.name}.weight"

    def weight(self) -> torch.Tensor:
        """The (out, in) weight, a view of the parameter's data (no autograd)."""
        data = self.module.weight.data
        return data.t() if self.transposed else data

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight().shape
        return int(out_features), int(in_features)

    def apply_mask(self, pruned: torch.Tensor) -> None:
        """Zero the pruned weights in place (``pruned`` is (out, in) bool, True = pruned)."""
        self.weight().masked_fill_(pruned.to(self.weight().device), 0.0)

    def set_weight(self, new_weight: torch.Tensor) -> None:
        """Overwrite the (out, in) weight in place."""
        self.weight().copy_(new_weight.to(dtype=self.weight().dtype))


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` without importing transformers for plain-torch users."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def prunable_modules(root: nn.Module, prefix: str = "") -> Iterator[TargetLayer]:
    """Every ``nn.Linear`` and ``Conv1D`` below ``root``, named from the model's root."""
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(module, nn.Linear):
            yield TargetLayer(full, module, transposed=False)
        elif _is_conv1d(module):
            yield TargetLayer(full, module, transposed=True)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Glob match on the module name or its parameter name; a bare word matches a name part.

    ``lm_head`` matches ``lm_head``; ``*.attention.*`` matches every attention linear;
    ``encoder.layer.0.*`` matches block 0.
    """
    parameter = f"{name}.weight"
    parts = name.split(".")
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(parameter, pattern):
            return True
        if "." not in pattern and any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def select_targets(
    layers: Sequence[TargetLayer], include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> list[TargetLayer]:
    """Keep layers matching any ``include`` pattern (all when empty) and no ``exclude`` one."""
    return [
        layer for layer in layers
        if (not include or matches(layer.name, include)) and not matches(layer.name, exclude)
    ]


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The transformer blocks: the longest ``ModuleList`` of same-class modules holding linears.

    Works for BERT (``encoder.layer``), GPT-2 (``transformer.h``), Llama/Mistral
    (``model.layers``) and most other stacks, without a per-architecture table.
    """
    best: tuple[str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if not any(True for _ in prunable_modules(children[0])):
            continue
        if best is None or len(children) > len(best[1]):
            best = (name, children)
    if best is None:
        raise UsageError("could not find the transformer blocks (a ModuleList of identical layers with linears)")
    return best


class ModelAdapter:
    """What the pipeline needs from a model. Subclasses fill in loading and the data path.

    ``blocks`` are pruned in order; each one's inputs are captured from the model whose
    earlier blocks are already pruned. ``targets(i)`` lists block i's prunable tensors.
    """

    model: nn.Module
    kind: str = "module"
    tokenizer: Any = None
    #: the folder the model was loaded from, whose non-weight files a save carries over
    source: Path | None = None

    def __init__(self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE):
        self.model = model.eval()
        self.blocks_prefix, self._blocks = find_blocks(model)
        self._targets: list[list[TargetLayer]] = []
        for index, block in enumerate(self._blocks):
            layers = list(prunable_modules(block, prefix=f"{self.blocks_prefix}.{index}"))
            self._targets.append(select_targets(layers, include, exclude))
        if not any(self._targets):
            raise UsageError("no prunable tensors left after --include/--exclude")

    # --------------------------------------------------------------- structure
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def targets(self, block_index: int) -> list[TargetLayer]:
        return list(self._targets[block_index])

    def all_targets(self) -> list[TargetLayer]:
        return [layer for layers in self._targets for layer in layers]

    # --------------------------------------------------------------- data path
    def call_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of ``model(...)`` for a batch."""
        return (), dict(batch)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        args, kwargs = self.call_inputs(batch)
        return self.model(*args, **kwargs)

    def run_to_first_block(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run the model on ``batch`` far enough to call block 0 (a hook then stops it)."""
        return self.forward(batch)

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(batch, seq) bool: True for real tokens, False for padding (excluded from statistics)."""
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()

    def loss(self, model_outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss for gradient-based scores and the Fisher objective."""
        raise UsageError(f"a {self.kind} model has no loss; pass one through the Python API")

    def save(self, folder: Path) -> None:
        raise NotImplementedError
