"""The block-output objective: judge iCBS's masks by what the transformer block outputs.

iCBS's block solver minimises each layer's own reconstruction error (docs/icbs.md §5),
and every layer of a transformer block is searched against the dense inputs of that
block. What the next block sees, though, is the block's *output*: errors of the query,
key, value, attention-output, up and down projections combine through softmax, GELU,
LayerNorm and the residual stream, and a mask that lowers one layer's error can raise
the block's. On the benchmark's causal LM the layer error fell fourfold under iCBS while
held-out perplexity got worse (docs/results.md).

``--block-output`` keeps the layer-wise QUBO as the solver's problem and adds an outer
acceptance test measured on the whole block: after the search, for every tensor of the
block, iCBS's mask and the initial (one-shot) mask are candidates, each with the weights
the run would give it (the refit of that mask with ``--refit``, else the original
weights). Starting from all iCBS masks, the tensors are visited in forward order and a
tensor goes back to its initial mask when that lowers the block-output error

    E = Σ_tokens ‖block(x; Ŵ) − block(x; W0)‖² / Σ_tokens ‖block(x; W0)‖²

on (a subset of) the block's calibration inputs — the inputs of the partly pruned model,
as for the Grams. Padding tokens are excluded. The choice is exact for the block output
(every candidate set is actually run), costs 1 + (number of tensors) forward passes of
the block, and can only lower ``E`` relative to iCBS's result.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from qsurgeon.server.models.capture import BlockInputs, run_block

#: most calibration sequences the block-output error is measured on: a forward pass of a MiniLM
#: block over all 256 samples costs about 2 s on 2 cores, and 64 samples rank the candidates the same
MAX_SAMPLES = 64


def _subset(inputs: BlockInputs, max_samples: int) -> BlockInputs:
    """The first batches of ``inputs`` holding at most ``max_samples`` sequences (at least one batch)."""
    chosen = BlockInputs()
    count = 0
    for args, kwargs, mask in zip(inputs.args, inputs.kwargs, inputs.token_masks):
        hidden = args[0] if args else kwargs["hidden_states"]
        if chosen.args and count + hidden.shape[0] > max_samples:
            break
        chosen.args.append(args)
        chosen.kwargs.append(kwargs)
        chosen.token_masks.append(mask)
        count += hidden.shape[0]
    return chosen


def _outputs(block: Any, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's hidden outputs for every batch, real tokens only, float64, (tokens, d)."""
    result = run_block(block, inputs)
    outputs = []
    for args, kwargs, mask in zip(result.args, result.kwargs, inputs.token_masks):
        hidden = args[0] if args else kwargs["hidden_states"]
        if mask is not None and hidden.shape[:-1] == mask.shape:
            hidden = hidden[mask]
        outputs.append(hidden.reshape(-1, hidden.shape[-1]).to(torch.float64))
    return outputs


class BlockOutputError:
    """``E(weights)`` of the module docstring for one transformer block.

    ``set_weight(name, tensor)`` writes a tensor into the model (the block's targets);
    the reference outputs are the block's with ``weights0`` on the same inputs.
    """

    def __init__(self, block: Any, inputs: BlockInputs, weights0: Mapping[str, torch.Tensor],
                 set_weight: Callable[[str, torch.Tensor], None], max_samples: int = MAX_SAMPLES):
        self.block, self.weights0, self.set_weight = block, dict(weights0), set_weight
        self.inputs = _subset(inputs, max_samples)
        self._restore()
        self.reference = _outputs(block, self.inputs)
        self.norm = sum(float((out * out).sum()) for out in self.reference) or 1.0
        self.evaluations = 0

    def _restore(self) -> None:
        for name, weight in self.weights0.items():
            self.set_weight(name, weight)

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> float:
        """Relative block-output error with ``weights`` (name → tensor) in place; the block is restored after."""
        try:
            for name, weight in weights.items():
                self.set_weight(name, weight)
            outputs = _outputs(self.block, self.inputs)
        finally:
            self._restore()
        self.evaluations += 1
        return sum(float(((out - ref) ** 2).sum()) for out, ref in zip(outputs, self.reference)) / self.norm


class LayerError:
    """The layer-wise calibration error with the same interface as :class:`BlockOutputError`:
    ``E(weights) = Σ_tensors ‖(Ŵ − W0) A‖² / ‖W0 A‖²`` (each tensor's relative error, summed).

    It is separable over tensors (and over rows), so the greedy choice of
    :func:`choose_by_block_output` is exact with it; per-tensor values are cached by the
    candidate tensor's identity, so each candidate is measured once.
    """

    def __init__(self, weights0: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor]):
        from qsurgeon.server.pruning.refit import weight_row_errors

        self._row_errors = weight_row_errors
        self.weights0, self.grams = dict(weights0), dict(grams)
        self.norms = {name: max(float(self._row_errors(torch.zeros_like(w0), w0, self.grams[name]).sum()), 1e-300)
                      for name, w0 in self.weights0.items()}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self.evaluations = 0

    def rows(self, name: str, weight: torch.Tensor,
             like: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-row error ``(w − w0)ᵀ H (w − w0)`` of one tensor (float64, absolute), cached.

        ``like=(other, changed)``: ``weight`` equals the tensor ``other`` outside the rows
        ``changed`` (bool), so only those rows are computed and the rest copied from ``other``'s.
        """
        key = (name, id(weight))
        if key not in self._cache:
            if like is not None:
                errors = self.rows(name, like[0]).clone()
                changed = like[1]
                errors[changed] = self._row_errors(self.weights0[name][changed], weight[changed], self.grams[name])
            else:
                errors = self._row_errors(self.weights0[name], weight, self.grams[name])
            self._cache[key] = errors
            self.evaluations += 1
        return self._cache[key]

    def tensor(self, name: str, weight: torch.Tensor) -> float:
        """Relative layer error of one tensor."""
        return float(self.rows(name, weight).sum()) / self.norms[name]

    def __call__(self, weights: Mapping[str, torch.Tensor]) -> float:
        return sum(self.tensor(name, weight) for name, weight in weights.items())


def choose_rows(error: LayerError, name: str, candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the candidate (mask, weight) with the lowest layer error: ``(mask, weight, index per row)``.

    Rows are independent in the layer error and in a row-wise or N:M density, so the mixed
    tensor meets the density exactly and its error is Σ_rows min over candidates, never above
    any candidate's. Ties keep the lower index (iCBS's candidate 0). The mixed tensor's row
    errors are cached with it, so judging it again costs nothing.
    """
    per_row = torch.stack([error.rows(name, weight) for _, weight in candidates])  # (candidates, rows)
    index = per_row.argmin(dim=0)
    mask = candidates[0][0].clone()
    weight = candidates[0][1].clone()
    for which in range(1, len(candidates)):
        rows = index == which
        mask[rows] = candidates[which][0][rows]
        weight[rows] = candidates[which][1][rows]
    error._cache[(name, id(weight))] = per_row.gather(0, index[None]).reshape(-1)
    return mask, weight, index


def choose_by_block_output(error: BlockOutputError | LayerError | Callable[[Mapping[str, torch.Tensor]], float],
                           names: list[str],
                           candidates: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[
                               dict[str, int], list[float]]:
    """Greedy per-tensor choice among ``candidates[name]`` = [(mask, weight), ...] (index 0 first).

    Starts from every tensor's candidate 0 (iCBS's), visits ``names`` in order and takes,
    for each, the candidate with the lowest block-output error given the choices so far.
    Returns the chosen index per tensor and the errors measured (the first is candidate 0's).
    """
    choice = {name: 0 for name in names}

    def weights() -> dict[str, torch.Tensor]:
        return {name: candidates[name][choice[name]][1] for name in names}

    best = error(weights())
    history = [best]
    for name in names:
        for index in range(1, len(candidates[name])):
            previous = choice[name]
            choice[name] = index
            value = error(weights())
            history.append(value)
            if value < best:
                best = value
            else:
                choice[name] = previous
    return choice, history


__all__ = ["BlockOutputError", "LayerError", "MAX_SAMPLES", "choose_by_block_output", "choose_rows"]
