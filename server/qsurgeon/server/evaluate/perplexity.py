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
