"""``qsurgeon bench quality``: every pruning method on MiniLM and a small causal LM.

Its own command module (not part of ``evaluate``) so that loading the benchmark, and the
LM training it may do, is never a side effect of the other commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
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
    quality.add_argument("--quick", action="store_true",
                         help="check the harness in a few minutes, not quality: densities 0.5 and 2:4, one "
                         "iCBS epoch, 8 calibration samples; MiniLM's first attention query only (1 of 36 "
                         "tensors); the cached benchmark LM, else one trained in seconds")
    quality.add_argument("--lm", default=None, metavar="DIR",
                         help="causal LM folder (default: reuse the benchmark LM from --cache, or train it "
                         "in-process: about 5 minutes, seconds with --quick)")
    quality.add_argument("--cache", default=None, metavar="DIR",
                         help="where trained benchmark LMs are kept (default: $QSURGEON_CACHE, else "
                         "$XDG_CACHE_HOME/qsurgeon or ~/.cache/qsurgeon)")
    quality.add_argument("--methods", default=None,
                         help="comma-separated subset of methods to run (default: all)")
    quality.add_argument("--models", default=None, help="comma-separated subset of: minilm, lm")
    quality.add_argument("--densities", default=None,
                         help="comma-separated densities and N:M patterns (default: 0.5,0.4,0.3,2:4)")
    quality.add_argument("--curve-epochs", default=None,
                         help="iCBS epochs sampled for the quality-vs-time curve (default: 0,1,2,4,8)")
    quality.add_argument("--json", action="store_true", help="print the results as JSON")
    quality.set_defaults(func=run_bench_quality)


def run_bench_quality(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from qsurgeon.server.bench.quality import BenchOptions, run_quality_bench, scope_line

    hf_logging.disable_progress_bar()  # loading bars would bury the benchmark's own log lines
    options = BenchOptions.from_cli(args)
    results = run_quality_bench(options, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    for key, entry in results["models"].items():
        print(scope_line(key, entry) + (" (quick: the harness, not quality)" if options.quick else ""))
    print(f"wrote {options.out}/results.md, results.json and plots")
    return 0
