"""Measuring a pruned model against its dense original.

Two tasks, picked from the model kind unless asked for:

- ``embeddings`` (encoders): mean cosine of the pruned model's sentence embeddings to the
  dense model's, and retrieval accuracy@1, on held-out sentences (:mod:`.embeddings`);
- ``perplexity`` (causal LMs): perplexity of both models on held-out text
  (:mod:`.perplexity`).

Both also report the achieved density of every prunable tensor of the pruned model, so
a result can never claim a quality it bought with extra weights.

Evaluation text is ``builtin`` (the held-out split of the built-in corpus, disjoint from
the calibration split) or a UTF-8 file: one sentence per line for embeddings, free text
(paragraphs separated by blank lines) for perplexity.

``qsurgeon evaluate`` and the quality benchmark (:mod:`qsurgeon.server.bench.quality`)
both score with :func:`evaluate_pair`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.evaluate.embeddings import agreement, sentence_embeddings
from qsurgeon.server.evaluate.perplexity import perplexity, token_windows
from qsurgeon.server.models.base import ModelAdapter
from qsurgeon.server.models.calibration import builtin_texts, read_text_file

Task = Literal["embeddings", "perplexity"]
TASKS: tuple[str, ...] = ("embeddings", "perplexity")


def tensor_densities(adapter: ModelAdapter) -> dict[str, float]:
    """Fraction of non-zero weights of every prunable tensor, keyed by parameter name."""
    return {
        target.parameter_name: float(torch.count_nonzero(target.weight())) / target.weight().numel()
        for target in adapter.all_targets()
    }


def overall_density(adapter: ModelAdapter) -> float:
    kept = total = 0
    for target in adapter.all_targets():
        kept += int(torch.count_nonzero(target.weight()))
        total += target.weight().numel()
    return kept / max(total, 1)


def default_task(adapter: Any) -> Task:
    return "perplexity" if getattr(adapter, "kind", "") == "causal-lm" else "embeddings"


def _paragraphs_of_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"evaluation file {str(path)!r} is not UTF-8 text") from None
    paragraphs = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not paragraphs:
        raise UsageError(f"evaluation file {str(path)!r} is empty")
    return paragraphs


def evaluation_texts(data: str, task: Task, samples: int) -> list[str]:
    """Held-out texts: ``samples`` sentences (embeddings) or enough paragraphs (perplexity)."""
    if samples < 1:
        raise UsageError(f"samples must be at least 1, got {samples}")
    if data == "builtin":
        # perplexity windows span several paragraphs: ask for plenty, the windows cap use
        count = samples if task == "embeddings" else samples * 8
        try:
            return builtin_texts(count, "heldout")
        except UsageError:
            return builtin_texts(samples, "heldout")
    path = Path(data).expanduser()
    if not path.is_file():
        raise UsageError(f"evaluation data {data!r} is not a file (or use 'builtin')")
    return read_text_file(path, samples) if task == "embeddings" else _paragraphs_of_file(path)


def check_same_architecture(dense: ModelAdapter, pruned: ModelAdapter) -> None:
    """Refuse to compare models whose prunable tensors differ in name or shape."""
    if getattr(dense, "kind", None) != getattr(pruned, "kind", None):
        raise UsageError(
            f"the models differ in kind: dense is {getattr(dense, 'kind', '?')}, pruned is {getattr(pruned, 'kind', '?')}"
        )
    dense_shapes = {t.parameter_name: t.shape for t in dense.all_targets()}
    pruned_shapes = {t.parameter_name: t.shape for t in pruned.all_targets()}
    if dense_shapes != pruned_shapes:
        differing = sorted(set(dense_shapes.items()) ^ set(pruned_shapes.items()))
        raise UsageError(f"the two models have different prunable tensors (first difference: {differing[0][0]})")


def evaluate_pair(
    dense: Any,
    pruned: Any,
    task: Task | None = None,
    data: str = "builtin",
    samples: int | None = None,
    seq_len: int = 128,
    dense_cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Compare a pruned model (an adapter) with its dense original on one task.

    ``samples``: sentences for embeddings (default 256), windows of ``seq_len`` tokens
    for perplexity (default 64). ``dense_cache`` (any dict, reused across calls with the
    same dense model) keeps the dense model's embeddings/perplexity and the evaluation
    inputs, so a benchmark scoring many pruned models runs the dense model once.
    """
    cache = dense_cache if dense_cache is not None else {}
    check_same_architecture(dense, pruned)
    task = task or default_task(dense)
    if task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "perplexity" and dense.kind != "causal-lm":
        raise UsageError(f"perplexity needs a causal language model; this is a {dense.kind} (use --task embeddings)")
    if task == "embeddings" and dense.kind == "causal-lm":
        raise UsageError("embedding agreement is for encoders; use --task perplexity for a causal LM")
    if seq_len < 2:
        raise UsageError(f"seq-len must be at least 2, got {seq_len}")
    tokenizer = dense.tokenizer
    if tokenizer is None:
        raise UsageError("the dense model folder has no tokenizer; evaluation needs one")
    result: dict[str, Any] = {"task": task, "data": data}
    key = (task, data, samples, seq_len)
    if task == "embeddings":
        if key not in cache:
            texts = evaluation_texts(data, task, samples or 256)
            cache[key] = (texts, sentence_embeddings(dense.model, tokenizer, texts, seq_len=seq_len))
        texts, dense_embeddings = cache[key]
        pruned_embeddings = sentence_embeddings(pruned.model, tokenizer, texts, seq_len=seq_len)
        result.update(agreement(dense_embeddings, pruned_embeddings))
        result["samples"] = len(texts)
    else:
        if key not in cache:
            windows = token_windows(tokenizer, evaluation_texts(data, task, samples or 64), seq_len,
                                    max_windows=samples or 64)
            cache[key] = (windows, perplexity(dense.model, windows))
        windows, dense_result = cache[key]
        pruned_result = perplexity(pruned.model, windows)
        result.update(
            dense_perplexity=dense_result.perplexity,
            perplexity=pruned_result.perplexity,
            windows=pruned_result.windows,
            tokens=pruned_result.tokens,
        )
    result["seq_len"] = seq_len
    result["density"] = overall_density(pruned)
    result["densities"] = tensor_densities(pruned)
    return result
