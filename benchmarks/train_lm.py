"""Train (or show) the small GPT-2-style LM the quality benchmark prunes.

A thin script over :mod:`qsurgeon.server.bench.lm`, which holds the corpus, the recipe and
the training loop (``qsurgeon bench quality`` trains the same model in-process when it is
not cached). The model lands in the cache ``bench quality`` reads by default, so running
this once ahead of the benchmark saves it the training time.

    .venv/bin/python benchmarks/train_lm.py [--out DIR] [--quick] [--steps N] [--max-minutes 9] [--force]

Training runs a fixed number of steps (deterministic for a given seed and corpus);
``--max-minutes`` is only a safety cap for a heavily loaded machine, and the report says
whether it cut training short. On a shared 2-core machine the full recipe's 600 steps
take about 5 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qsurgeon.server.bench.lm import FULL, LM_FOLDER, QUICK, QUICK_LM_FOLDER, default_cache_dir, is_trained, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"model folder (default: {default_cache_dir()}/{LM_FOLDER}, or {QUICK_LM_FOLDER} with --quick)")
    parser.add_argument("--quick", action="store_true", help="the seconds-long recipe bench quality --quick uses")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--max-minutes", type=float, default=None, help="safety cap on training time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the cache exists")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else FULL
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    out = args.out or default_cache_dir() / (QUICK_LM_FOLDER if args.quick else LM_FOLDER)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.force or not is_trained(out):
        report = train(out, recipe, args.seed, args.max_minutes, log=lambda line: print(line, flush=True))
    else:
        report = json.loads((out / "train_report.json").read_text())
    print(json.dumps(report, indent=2))
    print(f"model: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
