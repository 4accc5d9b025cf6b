"""Sequential capture of layer statistics, one transformer block at a time.

The layer-wise objective of block l must see the inputs block l receives *after* blocks
< l are pruned (docs/icbs.md §5, as SparseGPT and Wanda do). So the pipeline never runs the
whole model per block: it catches what block 0 is called with (positional and keyword
arguments, whatever the architecture passes: attention masks, rotary embeddings...),
then runs the blocks one by one, each on the previous block's pruned outputs. Memory
holds one block's activations for the calibration set plus that block's Gram matrices.

Padding tokens are excluded from every statistic: inputs of shape (batch, seq, d) are
filtered with the attention mask before ``H = A Aᵀ`` (float64) is accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from qsurgeon.server.models.base import ModelAdapter, StopForward, TargetLayer
from qsurgeon.server.models.calibration import CalibrationData


@dataclass
class LayerStats:
    """Statistics of one linear's inputs over the real calibration tokens (read-only once collected:
    linears that read the same input may share one instance)."""

    gram: torch.Tensor  # (in, in) float64: Σ a aᵀ over tokens (H of docs/icbs.md §5)
    tokens: int = 0
    #: (in, in) float64: Σ a āᵀ, ā the same token's input in the dense model (``--match-dense``)
    cross: torch.Tensor | None = None

    def input_norms(self) -> torch.Tensor:
        """||a_j||₂ over all tokens for every input feature j (Wanda's activation norms)."""
        return self.gram.diagonal().clamp_min(0.0).sqrt()


@dataclass
class BlockInputs:
    """What one block is called with, batch by batch, plus each batch's real-token mask."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    token_masks: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.args)


def capture_first_block_inputs(adapter: ModelAdapter, data: CalibrationData, batch_size: int = 16) -> BlockInputs:
    """Run the model's embedding stage on every batch and keep block 0's call arguments."""
    first_block = adapter.blocks()[0]
    captured = BlockInputs()

    def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.args.append(tuple(args))
        captured.kwargs.append(dict(kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in data.batches(batch_size, by_length=True):
                try:
                    adapter.run_to_first_block(batch)
                except StopForward:
                    pass
                else:  # pragma: no cover - a model whose forward never reaches block 0
                    raise RuntimeError("the model's forward pass never called its first block")
                captured.token_masks.append(adapter.token_mask(batch))
    finally:
        handle.remove()
    return captured


def to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) on ``device``; None: unchanged."""
    if device is None or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(item, device) for item in value)
    if isinstance(value, list):
        return [to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def move_inputs(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """All of ``inputs`` on ``device`` (block 0's inputs, captured on the host, to the GPU)."""
    return BlockInputs(args=[to_device(args, device) for args in inputs.args],
                       kwargs=[to_device(kwargs, device) for kwargs in inputs.kwargs],
                       token_masks=list(inputs.token_masks))


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _real_rows(inputs: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten a linear's input to (tokens, d) keeping only real tokens."""
    width = inputs.shape[-1]
    if token_mask is not None:
        if inputs.shape[:-1] == token_mask.shape:
            return inputs[token_mask]
        if inputs.ndim == 2 and inputs.shape[0] == token_mask.numel():
            return inputs[token_mask.reshape(-1)]
    return inputs.reshape(-1, width)


class _StatsCollector:
    """Forward hooks accumulating each target's Gram; shared inputs (q, k, v) computed once."""

    def __init__(self, targets: Sequence[TargetLayer], device: torch.device | None = None):
        self.stats: dict[str, LayerStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in targets]
        for layer in targets:
            width = layer.shape[1]
            self.stats[layer.parameter_name] = LayerStats(torch.zeros(width, width, dtype=torch.float64, device=device))

    def _hook(self, layer: TargetLayer):
        name = layer.parameter_name

        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            inputs = args[0].detach()
            key = (inputs.data_ptr(), tuple(inputs.shape))
            cached = self._cache.get(key)
            if cached is None:
                rows = _real_rows(inputs, self.token_mask).to(torch.float32)
                # One batch's Gram in float32 (a sum of ≤ a few thousand products, 2× faster
                # than float64 on CPU); the running sum over batches is float64.
                # Keep ``inputs`` alive in the cache so its memory cannot be reused by
                # another tensor of the same shape within this batch.
                cached = (inputs, (rows.T @ rows).to(torch.float64), int(rows.shape[0]))
                self._cache[key] = cached
            self.stats[name].gram += cached[1]
            self.stats[name].tokens += cached[2]

        return hook

    def next_batch(self, token_mask: torch.Tensor | None) -> None:
        self._cache.clear()
        self.token_mask = token_mask

    def close(self) -> None:
        self._cache.clear()
        for handle in self._handles:
            handle.remove()


def _call_block(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    output = block(*args, **kwargs)
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    return output


def collect_stats(block: nn.Module, targets: Sequence[TargetLayer], inputs: BlockInputs,
                  device: torch.device | None = None) -> dict[str, LayerStats]:
    """Run ``block`` on its inputs and return the Gram of every target (keyed by parameter name).

    With ``device`` (the block already there), each batch moves to it, the Grams are
    accumulated there in float64 and come back to host memory at the end (the methods and
    the iCBS QUBO builders read them on the host). Without it nothing moves.
    """
    collector = _StatsCollector(targets, device)
    try:
        with torch.no_grad():
            for args, kwargs, token_mask in zip(inputs.args, inputs.kwargs, inputs.token_masks):
                collector.next_batch(to_device(token_mask, device))
                _call_block(block, to_device(args, device), to_device(kwargs, device))
    finally:
        collector.close()
    if device is not None and device.type != "cpu":
        for stats in collector.stats.values():
            stats.gram = stats.gram.cpu()
    return collector.stats


def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device | None = None,
              keep_on: torch.device | None = None) -> BlockInputs:
    """Outputs of ``block`` as the next block's inputs (its other arguments are unchanged).

    ``device``: where the block runs (each batch moves there); ``keep_on``: where the
    outputs are kept (host memory when the activations of a whole calibration set would
    not fit beside the next block on the device). Both None: nothing moves.
    """
    result = BlockInputs(token_masks=list(inputs.token_masks))
    with torch.no_grad():
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            hidden = _call_block(block, *to_device((args, kwargs), device))
            if keep_on is not None:
                hidden = hidden.to(keep_on)
            append_call(result, args, kwargs, hidden)
    return result


def append_call(inputs: BlockInputs, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> None:
    """Add the next block's call to ``inputs``: ``hidden`` in place of the hidden states, the rest unchanged."""
    if args:
        inputs.args.append((hidden, *args[1:]))
        inputs.kwargs.append(kwargs)
    else:
        inputs.args.append(())
        inputs.kwargs.append({**kwargs, "hidden_states": hidden})


def iterate_blocks(adapter: ModelAdapter, data: CalibrationData, batch_size: int = 16) -> Iterable[tuple[int, BlockInputs]]:
    """Yield (index, inputs) per block; the caller prunes block i before asking for i + 1.

    The generator runs block i on its inputs only when the caller resumes it, so the
    outputs passed on already reflect the caller's pruning of block i.
    """
    inputs = capture_first_block_inputs(adapter, data, batch_size)
    blocks = adapter.blocks()
    for index, block in enumerate(blocks):
        yield index, inputs
        if index + 1 < len(blocks):
            inputs = run_block(block, inputs)


def relative_error(weight0: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """Layer-wise reconstruction error ||(W0 − Ŵ) A||² and the reference ||W0 A||².

    With Ŵ = W0 ∘ (1 − x) the error is Σ_rows (w0∘x)ᵀ H (w0∘x) (docs/icbs.md §5); the ratio of
    the two numbers is the relative error.
    """
    w0 = weight0.to(torch.float64)
    delta = w0 * pruned.to(torch.float64)
    error = float(((delta @ gram) * delta).sum())
    reference = float(((w0 @ gram) * w0).sum())
    return error, reference


def weight_error(weight0: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W0 − W) A||² for any new weight (after a refit too)."""
    delta = (weight0.to(torch.float64) - weight.to(torch.float64))
    return float(((delta @ gram) * delta).sum())


# ====================================================================== per-sample gradients
def _real_sequences(data: CalibrationData) -> list[torch.Tensor]:
    """Each sample's real tokens (padding dropped, whichever side it was on)."""
    return [ids[mask.bool()] for ids, mask in zip(data.input_ids, data.attention_mask)]


def dense_outputs(adapter: ModelAdapter, data: CalibrationData, batch_size: int = 16) -> list[torch.Tensor]:
    """The dense model's last hidden states per sample (real tokens only): self-distillation targets."""
    outputs: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in data.batches(batch_size):
            hidden = adapter.forward(batch).last_hidden_state
            outputs.extend(h[m.bool()].clone() for h, m in zip(hidden, batch["attention_mask"]))
    return outputs


def per_sample_gradients(
    adapter: ModelAdapter,
    data: CalibrationData,
    targets: Sequence[TargetLayer],
    distill_targets: list[torch.Tensor] | None = None,
    chunk_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Gradients of each sample's loss wrt every target weight, (samples, out, in) float32 per target.

    Uses ``torch.func``: ``vmap(grad(loss))`` over samples with ``functional_call`` at the
    model's current weights. Samples are grouped by their real length and run without
    padding or attention mask, so no padding token enters any gradient and the model's
    mask-building code (data-dependent, not vmappable) never runs. The loss is the
    next-token cross-entropy for causal LMs, ``adapter.loss`` for plain modules, and for
    encoders without a task head the squared distance of the last hidden states to the
    dense model's (``distill_targets``, from :func:`dense_outputs`).
    """
    from torch.func import functional_call, grad, vmap

    model = adapter.model
    names = [f"{layer.name}.weight" for layer in targets]
    weights = {name: model.get_parameter(name).detach() for name in names}
    sequences = _real_sequences(data)
    kind = adapter.kind
    if kind == "encoder" and distill_targets is None:
        raise ValueError("encoders need distill_targets (the dense model's outputs)")

    def sample_loss(params: dict[str, torch.Tensor], ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids[None]}
        args, kwargs = adapter.call_inputs(batch)  # no attention mask: the sample has no padding
        outputs = functional_call(model, params, args=args, kwargs=kwargs, strict=False)
        if kind == "causal-lm":
            return nn.functional.cross_entropy(outputs.logits[0, :-1], ids[1:])
        if kind == "encoder":
            return (outputs.last_hidden_state[0] - target).pow(2).sum(dim=-1).mean()
        return adapter.loss(outputs, batch)

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    by_length: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        if sequence.numel() >= 2:  # one token has no next-token loss
            by_length.setdefault(int(sequence.numel()), []).append(index)
    if not by_length:
        raise ValueError("no calibration sample has two or more real tokens")
    order = [index for length in sorted(by_length) for index in by_length[length]]
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for length in sorted(by_length):
        indices = by_length[length]
        ids = torch.stack([sequences[i] for i in indices])
        extra = (torch.stack([distill_targets[i] for i in indices]) if distill_targets is not None
                 else torch.zeros(len(indices), 1))
        gradients = per_sample(weights, ids, extra)
        for name in names:
            parts[name].append(gradients[name].detach())
    restore = torch.argsort(torch.tensor(order))  # back to calibration order
    result = {}
    for layer, name in zip(targets, names):
        stacked = torch.cat(parts[name])[restore]
        result[layer.parameter_name] = stacked.transpose(1, 2).contiguous() if layer.transposed else stacked
    return result
