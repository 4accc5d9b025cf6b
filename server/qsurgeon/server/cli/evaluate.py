"""``qsurgeon evaluate`` and ``qsurgeon bench quality``.

``evaluate DENSE PRUNED`` compares a pruned model folder with its dense original (cosine
and retrieval@1 of sentence embeddings for encoders, perplexity for causal LMs) and
reports the achieved density of every prunable tensor. ``bench quality`` runs every
pruning method on MiniLM and a small causal LM at several densities and writes a
markdown table, JSON and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
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

    bench = subparsers.add_parser("bench", help="reproducible benchmarks", description="Reproducible benchmarks.")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_commands.required = True
    quality = bench_commands.add_parser(
        "quality",
        help="every pruning method on MiniLM and a small causal LM",
        description="Run magnitude, Wanda, SparseGPT, iCBS and the iCBS quality preset on all-MiniLM-L6-v2 "
        "and a small causal LM at densities 0.5, 0.4, 0.3 and 2:4; write results.md, results.json and plots.",
    )
    quality.add_argument("--out", required=True, help="folder for results.md, results.json and the plots")
    quality.add_argument("--quick", action="store_true", help="a tiny version that finishes in a few minutes")
    quality.add_argument("--lm", default=None, metavar="DIR",
                         help="causal LM folder (default: train/reuse benchmarks/cache/tiny-gpt2)")
    quality.add_argument("--methods", default=None,
                         help="comma-separated subset of methods to run (default: all)")
    quality.add_argument("--models", default=None, help="comma-separated subset of: minilm, lm")
    quality.add_argument("--densities", default=None,
                         help="comma-separated densities and N:M patterns (default: 0.5,0.4,0.3,2:4)")
    quality.add_argument("--curve-epochs", default=None,
                         help="iCBS epochs sampled for the quality-vs-time curve (default: 0,1,2,4,8)")
    quality.add_argument("--json", action="store_true", help="print the results as JSON")
    quality.set_defaults(func=run_bench_quality)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value < 100 else f"{value:.1f}"


def _quiet_transformers() -> None:
    """Loading progress bars would bury the one-line result or error of a command."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_evaluate(args: argparse.Namespace) -> int:
    from qsurgeon.server.models.adapters import load_adapter
    from qsurgeon.server.evaluate.quality import evaluate_pair

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
    from qsurgeon.server.models.adapters import resolve_model
    from qsurgeon.server.evaluate.classification import evaluate_classification, format_classification
    from qsurgeon.server.evaluate.quality import overall_density, tensor_densities

    if pruned.kind != "image-classifier":
        raise UsageError(f"{args.pruned} is not an image classifier; --task classification needs one")
    result = evaluate_classification(resolve_model(args.dense), resolve_model(args.pruned), args.data)
    result.update(task="classification", density=overall_density(pruned), densities=tensor_densities(pruned))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_classification(result))
    print(f"density (all pruned tensors) {result['density']:.4f}")
    for name, density in result["densities"].items():
        print(f"  {density:.4f}  {name}")
    return 0


def run_bench_quality(args: argparse.Namespace) -> int:
    from qsurgeon.server.evaluate.quality import BenchOptions, run_quality_bench

    _quiet_transformers()
    options = BenchOptions.from_cli(args)
    results = run_quality_bench(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(f"wrote {options.out}/results.md, results.json and plots")
    return 0
