"""``--match-dense``: fit every layer to the dense model's output of that layer.

Without it a layer's target is its own output on the inputs it receives in the pruned
model (``W0 A``), so the error that earlier pruned layers put into ``A`` is never undone.
With it the target is the dense model's output, ``W0 Ā``, where ``Ā`` are the same tokens'
inputs in the dense model (the asymmetric objective of docs/quality.md). The pipeline then
keeps two streams of block inputs, the pruned model's and the dense model's, and needs the
cross-Gram ``C = Σ a āᵀ`` beside ``H = Σ a aᵀ``: ``pruning.refit.dense_targets`` turns
``(W0, H, C)`` into the target weights every method already minimises towards.

A layer's pruned-model inputs must come from the block with its *earlier layers already
pruned*: a target fitted to inputs that the pruning of q/k/v then changes corrects the
same error twice (measured on MiniLM: worse than no correction). So the block's linears are
pruned in groups, in execution order, layers that read the same input (q, k, v; gate, up)
together, and each group's statistics are collected after the groups before it are applied.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from qsurgeon.server.models.base import StopForward, TargetLayer
from qsurgeon.server.models.capture import (BlockInputs, LayerStats, _call_block, _hidden_of, _real_rows,
                                            append_call, to_device)
from qsurgeon.server.pruning.refit import dense_targets

#: the ridge of the dense-output fit towards W0, per unknown per equation: damping
#: ``RIDGE · (inputs / tokens)`` of mean(diag H). The fit has ``inputs`` unknowns per row and one
#: equation per calibration token, so the fewer tokens per input, the more it must be held back.
#: Fixed dampings could not serve both measured models (docs/quality.md): MiniLM (384–1536
#: inputs, 9,833 tokens) was best at 0.1–0.3, the causal LM (128–512 inputs, 16,384 tokens)
#: at 0.01; this rule is within 0.0006 cosine and 0.42 perplexity of the best of either.
RIDGE = 1.0


def dense_matching_weights(weights0: Mapping[str, torch.Tensor],
                           stats: Mapping[str, LayerStats]) -> dict[str, torch.Tensor]:
    """The target weights W0' of a group's layers (``pruning.refit.dense_targets``, damped by
    :data:`RIDGE`); layers that read the same input share one LayerStats and so one solve's factor."""
    shared: dict[int, list[str]] = {}
    for name in weights0:
        shared.setdefault(id(stats[name]), []).append(name)
    targets: dict[str, torch.Tensor] = {}
    for names in shared.values():
        layer = stats[names[0]]
        damp = RIDGE * layer.gram.shape[0] / max(1, layer.tokens)
        targets.update(zip(names, dense_targets([weights0[name] for name in names], layer.gram, layer.cross, damp)))
    return targets


def input_groups(block: nn.Module, targets: Sequence[TargetLayer], inputs: BlockInputs,
                 device: torch.device | None = None) -> list[list[TargetLayer]]:
    """``targets`` in the order the block calls them, grouped by the input tensor they share.

    Found by one forward pass of the first calibration batch with hooks that record the
    order and the identity of each linear's input.
    """
    calls: list[tuple[TargetLayer, torch.Tensor]] = []  # the inputs are kept alive: no address is reused
    seen: set[str] = set()

    def hook_for(layer: TargetLayer):
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            if layer.parameter_name not in seen:  # a module called twice counts at its first call
                seen.add(layer.parameter_name)
                calls.append((layer, args[0]))
        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in targets]
    try:
        with torch.no_grad():
            _call_block(block, to_device(inputs.args[0], device), to_device(inputs.kwargs[0], device))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[TargetLayer]] = []
    for number, (layer, tensor) in enumerate(calls):
        if number and tensor is calls[number - 1][1]:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    missing = [layer for layer in targets if layer.parameter_name not in seen]
    return groups + ([missing] if missing else [])  # never called on calibration data: one last group


class _GroupInput:
    """Hooks on one group's linears, which all read the same input: each pass hands that
    input's real-token rows to ``on_rows`` once and, with ``stop_early``, ends the block's
    forward right there (nothing after it is needed)."""

    def __init__(self, group: Sequence[TargetLayer]):
        self.on_rows: Any = None
        self.stop_early = True
        self.token_mask: torch.Tensor | None = None
        self.done = False
        self._handles = [layer.module.register_forward_hook(self._hook) for layer in group]

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        if self.done:
            return
        self.done = True
        self.on_rows(_real_rows(args[0].detach(), self.token_mask).to(torch.float32))
        if self.stop_early:
            raise StopForward

    def run(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], token_mask: torch.Tensor | None,
            on_rows: Any, stop_early: bool) -> torch.Tensor | None:
        self.token_mask, self.on_rows, self.stop_early, self.done = token_mask, on_rows, stop_early, False
        try:
            return _call_block(block, args, kwargs)
        except StopForward:
            return None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def collect_matched_stats(block: nn.Module, group: Sequence[TargetLayer], inputs: BlockInputs, dense: BlockInputs,
                          originals: Sequence[tuple[TargetLayer, torch.Tensor]], device: torch.device | None = None,
                          outputs: bool = False) -> tuple[dict[str, LayerStats], BlockInputs | None]:
    """``H`` and ``C`` of the input that ``group``'s linears share, and with ``outputs`` the
    dense stream's next inputs.

    ``inputs`` and ``dense`` hold the same batches in the pruned and the dense model.
    ``originals``: the block's linears pruned so far with their original weights, put back
    for each dense pass and taken out after it. Both passes stop at the group's input,
    except a dense pass whose outputs are wanted.
    """
    width = group[0].shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    cross = torch.zeros_like(gram)
    tokens = 0
    pruned: torch.Tensor | None = None  # this batch's rows in the pruned model, paired with the dense pass's

    def pruned_rows(rows: torch.Tensor) -> None:
        nonlocal tokens, pruned
        gram.add_((rows.T @ rows).to(torch.float64))  # per batch in float32, summed in float64
        tokens += int(rows.shape[0])
        pruned = rows

    def dense_rows(rows: torch.Tensor) -> None:
        cross.add_((pruned.T @ rows).to(torch.float64))

    pruned_weights = [(layer, layer.weight().detach().clone()) for layer, _ in originals]
    following = BlockInputs(token_masks=list(dense.token_masks)) if outputs else None
    hooks = _GroupInput(group)
    try:
        with torch.no_grad():
            for index, (args, kwargs, mask) in enumerate(zip(inputs.args, inputs.kwargs, inputs.token_masks)):
                mask = to_device(mask, device)
                hooks.run(block, to_device(args, device), to_device(kwargs, device), mask, pruned_rows, True)
                dense_args, dense_kwargs = dense.args[index], dense.kwargs[index]
                for layer, original in originals:
                    layer.set_weight(original)
                try:
                    hidden = hooks.run(block, to_device(dense_args, device), to_device(dense_kwargs, device), mask,
                                       dense_rows, not outputs)
                finally:
                    for layer, weight in pruned_weights:
                        layer.set_weight(weight)
                if following is not None:
                    append_call(following, dense_args, dense_kwargs,
                                hidden.to(_hidden_of(dense_args, dense_kwargs).device))
    finally:
        hooks.close()
    if device is not None and device.type != "cpu":
        gram, cross = gram.cpu(), cross.cpu()
    # the group's linears share one input, so they share its H and C (read-only everywhere)
    stats = LayerStats(gram, tokens, cross)
    return {layer.parameter_name: stats for layer in group}, following
