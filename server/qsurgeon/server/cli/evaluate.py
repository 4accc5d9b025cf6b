"""``qsurgeon evaluate``: compare a pruned model folder with its dense original.

Cosine and retrieval@1 of sentence embeddings for encoders, perplexity for causal LMs,
top-1/top-5 for image classifiers, and the achieved density of every prunable tensor.
(``qsurgeon bench`` lives in :mod:`.bench`.)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qsurgeon.client.errors import UsageError


def register(subparsers: Any) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="compare a pruned model with its dense original",
        description="Compare a pruned model with its dense original: embedding agreement (encoders) or "
        "perplexity (causal LMs), plus the achieved density of every prunable tensor.",
    )
    evaluate.add_argument("dense", metavar="DENSE", help="dense model: a local HF folder or builtin:minilm")
    evaluate.add_argument("pruned", metavar="PRUNED", help="pruned model folder (as written by qsurgeon prune)")
    evaluate.add_argument("--task", choices=("embeddings", "perplexity", "classification"), default=None,
                          help="default: perplexity for causal LMs, classification for image classifiers, "
                               "embeddings otherwise")
    evaluate.add_argument("--data", default="builtin", metavar="FILE|builtin",
                          help="held-out text: a UTF-8 file (one sentence per line for embeddings, "
                          "paragraphs for perplexity) or builtin (default)")
    evaluate.add_argument("--samples", type=int, default=None,
                          help="sentences (embeddings, default 256) or windows (perplexity, default 64)")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per sentence/window (default 128)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(func=run_evaluate)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value < 100 else f"{value:.1f}"


def _quiet_transformers() -> None:
    """Loading progress bars would bury the one-line result or error of a command."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_evaluate(args: argparse.Namespace) -> int:
    from qsurgeon.server.evaluate.compare import evaluate_pair
    from qsurgeon.server.models.loading import load_adapter

    _quiet_transformers()

    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {args.samples}")
    dense = load_adapter(args.dense)
    pruned = load_adapter(args.pruned)
    if args.task == "classification" or (args.task is None and dense.kind == "image-classifier"):
        return _evaluate_classification(args, pruned)
    result = evaluate_pair(dense, pruned, task=args.task, data=args.data, samples=args.samples, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["task"] == "embeddings":
        print(f"cosine to dense      {result['cosine']:.4f}  ({result['samples']} held-out sentences)")
        print(f"retrieval@1          {result['retrieval_at_1']:.4f}")
    else:
        print(f"perplexity dense     {_fmt(result['dense_perplexity'])}")
        print(f"perplexity pruned    {_fmt(result['perplexity'])}  ({result['tokens']} tokens)")
    print(f"density (all pruned tensors) {result['density']:.4f}")
    for name, density in result["densities"].items():
        print(f"  {density:.4f}  {name}")
    return 0


def _evaluate_classification(args: argparse.Namespace, pruned: Any) -> int:
    """Top-1/top-5 of both image classifiers on labelled images, and the pruned densities."""
    from qsurgeon.server.evaluate.classification import evaluate_classification, format_classification
    from qsurgeon.server.evaluate.compare import overall_density, tensor_densities
    from qsurgeon.server.models.folders import model_folder

    if pruned.kind != "image-classifier":
        raise UsageError(f"{args.pruned} is not an image classifier; --task classification needs one")
    result = evaluate_classification(model_folder(args.dense), model_folder(args.pruned), args.data)
    result.update(task="classification", density=overall_density(pruned), densities=tensor_densities(pruned))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_classification(result))
    print(f"density (all pruned tensors) {result['density']:.4f}")
    for name, density in result["densities"].items():
        print(f"  {density:.4f}  {name}")
    return 0

