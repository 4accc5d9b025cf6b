"""Perplexity of a causal language model on held-out text.

The texts are tokenised, joined with the end-of-text token into one stream and cut into
non-overlapping windows of ``seq_len`` tokens; perplexity is ``exp`` of the mean
next-token cross-entropy over every predicted token of every window. Non-overlapping
windows (rather than a sliding window) make it cheap and identical for the dense and the
pruned model, which is all a comparison needs; absolute values are therefore slightly
higher than sliding-window figures in papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from qsurgeon.client.errors import UsageError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per token
    tokens: int  # predicted tokens the mean is over
    windows: int


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, seq_len) int64 ids: the texts joined by end-of-text, cut into windows."""
    if tokenizer is None:
        raise UsageError("perplexity needs the model's tokenizer, and this model folder has none")
    if seq_len < 2:
        raise UsageError(f"seq_len must be at least 2 for next-token prediction, got {seq_len}")
    separator = tokenizer.eos_token_id
    needed = None if max_windows is None else max_windows * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if separator is not None:
            ids.append(int(separator))
        if needed is not None and len(ids) >= needed:
            break
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UsageError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> PerplexityResult:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on token ``windows``."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise UsageError(f"windows must be (count, seq_len >= 2), got {tuple(windows.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(min(mean_nll, 700.0)), mean_nll, total_tokens, int(windows.shape[0]))


# ====================================================================== as the field reports it
@dataclass(frozen=True)
class StridedPerplexity:
    """Perplexity with the settings that decide its value: window length, stride, tokens scored."""

    perplexity: float
    mean_nll: float
    seq_len: int
    stride: int
    tokens: int  # predicted tokens the mean is over
    windows: int
    device: str


def read_token_ids(path: str | Path) -> torch.Tensor:
    """A tokenized held-out set as one 1-D stream of ids.

    ``.npy``: 1-D or 2-D integers (rows are joined in order); ``.safetensors``: a tensor
    ``input_ids`` (1-D or 2-D), with an optional ``attention_mask`` whose zeros (padding)
    are dropped before the rows are joined.
    """
    import numpy as np

    path = Path(path)
    mask = None
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise UsageError(f"cannot read {str(path)!r} as a plain .npy array: {error}") from None
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise UsageError(f"cannot read {str(path)!r} as safetensors: {error}") from None
        if "input_ids" not in arrays:
            raise UsageError(f"{str(path)!r} must hold a tensor named 'input_ids' (found: {', '.join(arrays)})")
        ids, mask = arrays["input_ids"], arrays.get("attention_mask")
    else:
        raise UsageError(f"token ids must be a .npy or .safetensors file, got {str(path)!r}")
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
        raise UsageError(f"token ids must be a non-empty 1-D or 2-D integer array, got {ids.dtype} {ids.shape}")
    if mask is not None:
        if mask.shape != ids.shape:
            raise UsageError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        ids = ids[mask != 0]
    return torch.from_numpy(np.ascontiguousarray(ids.reshape(-1)).astype(np.int64))


def text_token_ids(tokenizer: Any, texts: Sequence[str], limit: int | None = None) -> torch.Tensor:
    """Texts joined by end-of-text into one stream of ids (at most ``limit``)."""
    if tokenizer is None:
        raise UsageError("perplexity on text needs the model's tokenizer, and this model folder has none "
                         "(give token ids: .npy or .safetensors)")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids[:limit] if limit is not None else ids, dtype=torch.long)


@torch.no_grad()
def strided_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                       max_windows: int | None = None, batch_size: int = 8,
                       device: torch.device | str | None = None) -> StridedPerplexity:
    """Sliding-window perplexity over a stream of ids, as papers report it.

    Windows of ``seq_len`` tokens start every ``stride`` tokens; the first window scores
    all its ``seq_len − 1`` predictions, each later one only its last ``min(stride,
    seq_len − 1)``, so every scored token has at least ``seq_len − stride`` tokens of
    context and none is scored twice. ``stride = seq_len`` (the default) is the cheap
    non-overlapping evaluation :func:`perplexity` computes, with the same value.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise UsageError(f"seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UsageError(f"stride must lie in 1..seq-len ({seq_len}), got {stride}")
    ids = ids.reshape(-1).long()
    if ids.numel() < seq_len:
        raise UsageError(f"the evaluation data has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = list(range(0, ids.numel() - seq_len + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    fresh = min(stride, seq_len - 1)
    try:
        for first in range(0, len(starts), batch_size):
            chunk = starts[first:first + batch_size]
            batch = torch.stack([ids[start:start + seq_len] for start in chunk]).to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="none").view(len(chunk), -1)
            for row, start in enumerate(chunk):
                keep = seq_len - 1 if start == 0 else fresh
                total_nll += float(nll[row, -keep:].double().sum())
                total_tokens += keep
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return StridedPerplexity(math.exp(min(mean_nll, 700.0)), mean_nll, seq_len, stride, total_tokens,
                             len(starts), str(device))
