"""How close a pruned encoder's sentence embeddings stay to the dense model's.

Sentence embeddings are the mean of the last hidden states over real tokens (the
pooling all-MiniLM-L6-v2 was trained with), L2-normalised. Two numbers:

- ``cosine``: mean cosine between each text's pruned and dense embedding;
- ``retrieval_at_1``: the fraction of texts whose pruned embedding is closest to its own
  dense embedding among all texts' dense embeddings (a retrieval sanity check; every
  calibrated method scores near 1 on MiniLM, docs/quality.md: cosine is what separates them).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def sentence_embeddings(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 128,
                        batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, normalised last hidden states: (texts, hidden) float32."""
    chunks = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                max_length=seq_len, return_tensors="pt")
            hidden = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
            weights = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            chunks.append(nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(chunks)


def agreement(dense_embeddings: torch.Tensor, pruned_embeddings: torch.Tensor) -> dict[str, float]:
    """Cosine and retrieval@1 between two aligned sets of normalised embeddings."""
    cosine = (dense_embeddings * pruned_embeddings).sum(dim=-1)
    similarity = pruned_embeddings @ dense_embeddings.T
    hits = similarity.argmax(dim=1) == torch.arange(similarity.shape[0])
    return {"cosine": float(cosine.mean()), "retrieval_at_1": float(hits.float().mean())}


def embedding_agreement(dense: nn.Module, pruned: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                        seq_len: int = 128, batch_size: int = 32) -> dict[str, float]:
    """Mean cosine of pruned vs dense sentence embeddings on ``texts``, and retrieval@1."""
    dense_embeddings = sentence_embeddings(dense, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
    pruned_embeddings = sentence_embeddings(pruned, tokenizer, texts, seq_len=seq_len, batch_size=batch_size)
    return agreement(dense_embeddings, pruned_embeddings)
