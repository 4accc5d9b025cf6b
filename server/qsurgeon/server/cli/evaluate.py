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
                          "paragraphs for perplexity), token ids for perplexity (.npy 1-D/2-D ints, or "
                          ".safetensors with input_ids and optional attention_mask), or builtin (default)")
    evaluate.add_argument("--samples", type=int, default=None,
                          help="sentences (embeddings, default 256) or windows (perplexity, default 64)")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per sentence/window (default 128)")
    evaluate.add_argument("--stride", type=int, default=None,
                          help="perplexity: a window starts every STRIDE tokens and scores only its tokens not "
                          "scored before (default: seq-len, non-overlapping windows)")
    evaluate.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                          help="where the models run (default auto: cuda when available); one model at a time")
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
    from qsurgeon.server.engine.placement import resolve_device

    device = resolve_device(args.device)
    dtype = None if device.type == "cpu" else "auto"  # on a GPU the checkpoint's dtype, as prune loads it
    dense = load_adapter(args.dense, dtype=dtype)
    pruned = load_adapter(args.pruned, dtype=dtype)
    if args.task == "classification" or (args.task is None and dense.kind == "image-classifier"):
        return _evaluate_classification(args, pruned)
    if args.task == "perplexity" or (args.task is None and dense.kind == "causal-lm"):
        return _evaluate_perplexity(args, dense, pruned, device)
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


def _evaluate_perplexity(args: argparse.Namespace, dense: Any, pruned: Any, device: Any) -> int:
    """Sliding-window perplexity of both models, stating the sequence length, stride and tokens used."""
    from pathlib import Path

    from qsurgeon.server.evaluate.compare import check_same_architecture, evaluation_texts, overall_density, \
        tensor_densities
    from qsurgeon.server.evaluate.perplexity import read_token_ids, strided_perplexity, text_token_ids

    check_same_architecture(dense, pruned)
    if dense.kind != "causal-lm":
        raise UsageError(f"perplexity needs a causal language model; this is a {dense.kind} (use --task embeddings)")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {args.seq_len}")
    stride = args.stride if args.stride is not None else args.seq_len
    if not 1 <= stride <= args.seq_len:
        raise UsageError(f"--stride must lie in 1..--seq-len ({args.seq_len}), got {stride}")
    windows = args.samples or 64
    if args.data != "builtin" and Path(args.data).suffix in (".npy", ".safetensors"):
        if not Path(args.data).expanduser().is_file():
            raise UsageError(f"evaluation data {args.data!r} is not a file (or use 'builtin')")
        ids, source = read_token_ids(Path(args.data).expanduser()), "token ids"
    else:
        needed = args.seq_len + stride * (windows - 1)
        ids, source = text_token_ids(dense.tokenizer, evaluation_texts(args.data, "perplexity", windows), needed), "text"
    results = {}
    for name, adapter in (("dense", dense), ("pruned", pruned)):
        adapter.model.to(device)
        try:
            results[name] = strided_perplexity(adapter.model, ids, args.seq_len, stride, max_windows=windows,
                                               device=device)
        finally:
            adapter.model.to("cpu")
    result = {
        "task": "perplexity", "data": args.data, "source": source, "dense_perplexity": results["dense"].perplexity,
        "perplexity": results["pruned"].perplexity, "seq_len": args.seq_len, "stride": stride,
        "tokens": results["pruned"].tokens, "windows": results["pruned"].windows, "device": str(device),
        "density": overall_density(pruned), "densities": tensor_densities(pruned),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"perplexity dense     {_fmt(result['dense_perplexity'])}")
    print(f"perplexity pruned    {_fmt(result['perplexity'])}  ({result['tokens']} tokens)")
    print(f"evaluated on         {result['tokens']} scored tokens of {source} ({args.data}), {result['windows']} "
          f"windows of {args.seq_len} tokens, stride {stride}, device {result['device']}")
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

