"""Keeping a pruned model's zeros zero while it is fine-tuned.

A pruned folder loads in ``transformers`` as any other model, but an optimiser step
writes into every weight: after one step of Adam the pruned weights are no longer zero
and the sparsity the prune bought is gone. :func:`keep_masks` fixes that for any torch
optimiser (and so for ``transformers.Trainer``, which steps a torch optimiser):

- a gradient hook zeroes the gradient of every pruned weight, so the optimiser's
  moments there stay zero (no momentum leaks into pruned positions);
- an optimiser step post-hook re-applies the masks after every step, which also undoes
  what decoupled weight decay or any other rule would write there.

.. code-block:: python

    from transformers import AutoModelForCausalLM
    from qsurgeon.server.finetune import keep_masks, load_masks

    model = AutoModelForCausalLM.from_pretrained("my-llama-24")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    handle = keep_masks(model, load_masks("my-llama-24"), optimizer)
    ...  # train as usual; handle.remove() when done

Without an optimiser only the gradient hooks are installed (and ``handle.apply()``
re-applies the masks on demand), e.g. for a training loop that updates weights itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qsurgeon.client.errors import UsageError

MASKS_FILE = "masks.safetensors"


def load_masks(folder: str | Path) -> dict[str, torch.Tensor]:
    """The masks a prune wrote (``masks.safetensors``: parameter name → (out, in) bool, True = pruned)."""
    from safetensors.torch import load_file

    path = Path(folder) / MASKS_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise UsageError(f"no {MASKS_FILE} at {str(path)!r} (written by qsurgeon prune --out)")
    return {name: mask.bool() for name, mask in load_file(str(path)).items()}


class MaskHandle:
    """What :func:`keep_masks` installed; ``apply()`` zeroes the pruned weights, ``remove()`` undoes the hooks."""

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = pairs
        self.handles: list[Any] = []

    @torch.no_grad()
    def apply(self) -> None:
        for parameter, pruned in self.pairs:
            parameter.masked_fill_(pruned, 0.0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _parameter_mask(parameter: nn.Parameter, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The mask laid out as the parameter stores it (GPT-2's Conv1D keeps (in, out))."""
    mask = mask.to(torch.bool)
    if tuple(mask.shape) == tuple(parameter.shape):
        return mask.to(parameter.device)
    if mask.ndim == 2 and tuple(mask.t().shape) == tuple(parameter.shape):
        return mask.t().contiguous().to(parameter.device)
    raise UsageError(f"mask {name} has shape {tuple(mask.shape)}, the parameter {tuple(parameter.shape)}")


def keep_masks(model: nn.Module, masks: Mapping[str, torch.Tensor],
               optimizer: torch.optim.Optimizer | None = None) -> MaskHandle:
    """Keep the pruned weights of ``model`` at zero through training; returns a :class:`MaskHandle`.

    ``masks``: parameter name → bool mask (True = pruned), as ``masks.safetensors`` holds
    them. Every name must be a parameter of ``model``. The masks are applied at once.
    """
    parameters = dict(model.named_parameters())
    pairs = []
    for name, mask in masks.items():
        if name not in parameters:
            raise UsageError(f"the model has no parameter {name!r} (are these the masks of this model?)")
        pairs.append((parameters[name], _parameter_mask(parameters[name], mask, name)))
    handle = MaskHandle(pairs)
    handle.apply()
    for parameter, pruned in pairs:
        if parameter.requires_grad:
            handle.handles.append(parameter.register_hook(lambda grad, pruned=pruned: grad.masked_fill(pruned, 0.0)))
    if optimizer is not None:
        handle.handles.append(optimizer.register_step_post_hook(lambda *_: handle.apply()))
    return handle


def sparsity_kept(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> bool:
    """True when every pruned weight of ``model`` is exactly zero."""
    parameters = dict(model.named_parameters())
    return all(
        not bool(parameters[name].detach()[_parameter_mask(parameters[name], mask, name)].any())
        for name, mask in masks.items()
    )


__all__ = ["MASKS_FILE", "MaskHandle", "keep_masks", "load_masks", "sparsity_kept"]
