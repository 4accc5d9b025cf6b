"""Wanda vs iCBS (layer-wise) on all-MiniLM-L6-v2: all 36 encoder linears, several densities.

For every sparsity (0.5, 0.4, 0.3 per row and 2:4) and method, prune the built-in model
with :func:`run_prune` (builtin calibration split) and measure on the HELD-OUT split,
which never overlaps the calibration text:

- total relative reconstruction error Σ‖(W0 − Ŵ)A‖² / Σ‖W0 A‖² over all 36 linears, with
  A the held-out inputs of each linear in the dense model (one Gram per linear, shared
  by every method, so every method is scored on the same activations);
- mean cosine of mean-pooled sentence embeddings to the dense model's, and retrieval@1;
- seconds (total run_prune wall time, and iCBS's share) and CPU seconds (all threads),
  which stay comparable when other processes share the cores.

Run:  .venv/bin/python benchmarks/prune_minilm.py [--densities 0.5 0.4 0.3 2:4] [--epochs 1]
      [--solvers sa auto]   (iCBS once per block solver: compares the solvers' masks)
Writes benchmarks/out/prune_minilm.json and prints a markdown table. Timings are noisy
when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# This folder holds scripts, not modules: keep it off sys.path so a script named like a
# standard-library module (benchmarks/queue.py) cannot shadow it.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qsurgeon.server.models.loading import load_adapter  # noqa: E402
from qsurgeon.server.models.calibration import builtin_texts, tokenize_texts  # noqa: E402
from qsurgeon.server.models.capture import collect_stats, iterate_blocks, weight_error  # noqa: E402
from qsurgeon.server.evaluate.embeddings import agreement, sentence_embeddings  # noqa: E402
from qsurgeon.server.engine.run import PruneOptions, run_prune  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "prune_minilm.json"


def heldout_grams(adapter, texts: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    """Gram of every target's inputs on held-out text, captured from the DENSE model."""
    data = tokenize_texts(adapter.tokenizer, texts, seq_len)
    grams = {}
    for index, inputs in iterate_blocks(adapter, data):
        for name, stats in collect_stats(adapter.blocks()[index], adapter.targets(index), inputs).items():
            grams[name] = stats.gram
    return grams


def heldout_error(dense, pruned, grams: dict[str, torch.Tensor]) -> float:
    error = reference = 0.0
    pruned_targets = {layer.parameter_name: layer for layer in pruned.all_targets()}
    for layer in dense.all_targets():
        name = layer.parameter_name
        weight0 = layer.weight()
        error += weight_error(weight0, pruned_targets[name].weight(), grams[name])
        reference += weight_error(weight0, torch.zeros_like(weight0), grams[name])
    return error / reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", nargs="+", default=["0.5", "0.4", "0.3", "2:4"])
    parser.add_argument("--methods", nargs="+", default=["wanda", "icbs"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=256, help="held-out texts for every metric")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--refit", action="store_true", help="also refit kept weights")
    parser.add_argument("--solvers", nargs="+", default=[None],
                        help="iCBS block solvers to compare (default: the prune default)")
    parser.add_argument("--out", default=str(OUT), help="JSON output path")
    args = parser.parse_args(argv)

    dense = load_adapter("builtin:minilm")
    texts = builtin_texts(args.heldout, "heldout")
    grams = heldout_grams(dense, texts, args.seq_len)
    dense_embeddings = sentence_embeddings(dense.model, dense.tokenizer, texts, seq_len=args.seq_len)
    rows = []
    for level in args.densities:
        pattern = level if ":" in level else None
        density = None if pattern else float(level)
        runs = [(method, solver) for method in args.methods
                for solver in (args.solvers if method == "icbs" else [None])]
        for method, solver in runs:
            chosen = {} if solver is None else {"solver": solver}
            options = PruneOptions(model="builtin:minilm", method=method, density=density, pattern=pattern,
                                   epochs=args.epochs, block_size=args.block_size, samples=args.samples,
                                   seq_len=args.seq_len, refit=args.refit, **chosen)
            started = time.perf_counter()
            result = run_prune(options)
            seconds = time.perf_counter() - started
            pruned_embeddings = sentence_embeddings(result.adapter.model, dense.tokenizer, texts, seq_len=args.seq_len)
            row = {
                "sparsity": level, "method": method if solver is None else f"{method}[{solver}]",
                "solver": options.solver if method == "icbs" else None,
                "heldout_relative_error": heldout_error(dense, result.adapter, grams),
                "calibration_relative_error": result.report["summary"]["relative_error_final"],
                **agreement(dense_embeddings, pruned_embeddings),
                "seconds": seconds, "seconds_icbs": result.report["seconds"]["icbs"],
                "cpu_seconds": result.report["cpu_seconds"],
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print("| sparsity | method | held-out rel. error | calibration rel. error | cosine to dense | retrieval@1 "
          "| wall s (iCBS) | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sparsity']} | {row['method']} | {row['heldout_relative_error']:.4f} | "
              f"{row['calibration_relative_error']:.4f} | {row['cosine']:.4f} | "
              f"{row['retrieval_at_1']:.3f} | {row['seconds']:.0f} ({row['seconds_icbs']:.0f}) | {row['cpu_seconds']:.0f} |")
    wins = all(
        icbs["heldout_relative_error"] < wanda["heldout_relative_error"] and icbs["cosine"] > wanda["cosine"]
        for wanda in rows if wanda["method"] == "wanda"
        for icbs in rows if icbs["method"].startswith("icbs") and icbs["sparsity"] == wanda["sparsity"]
    )
    print(f"iCBS beats Wanda on held-out error and cosine at every sparsity: {wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
