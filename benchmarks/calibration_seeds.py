"""The quality preset against the anchors on disjoint calibration sets: the spread issue #16 asks for.

    python benchmarks/calibration_seeds.py [--model lm|minilm] [--sets 3] [--densities 0.5,0.4,0.3,2:4]
                                           [--json out.json]

Calibration set ``s`` is the built-in corpus's calibration paragraphs ``s·N … (s+1)·N − 1``
(N = the benchmark's sample count: 128 for the LM, 256 for MiniLM), so the sets are disjoint;
``--seed`` alone moves nothing here (ALPS is deterministic and, from its mask, iCBS's search
found no better block on the LM). Every run is scored as ``qsurgeon bench quality`` scores it,
on the same held-out text. Prints one Markdown table (the metric per method, density and set,
and the preset's margin over the best anchor of the same set) and writes JSON with ``--json``.
The LM must be cached (``benchmarks/train_lm.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qsurgeon.server.bench import quality
from qsurgeon.server.bench.lm import LM_FOLDER, default_cache_dir
from qsurgeon.server.models.calibration import builtin_texts, tokenize_texts
from qsurgeon.server.models.loading import load_adapter

METHODS = ("icbs-quality", "alps", "wanda+refit", "sparsegpt")


def spec_of(model: str) -> quality.ModelSpec:
    if model == "minilm":
        return quality.ModelSpec("minilm", "builtin:minilm", "builtin", samples=256, seq_len=128, eval_samples=256,
                                 eval_seq_len=128)
    folder = default_cache_dir() / LM_FOLDER
    if not (folder / "heldout.txt").is_file():
        raise SystemExit(f"no benchmark LM in {folder}: run benchmarks/train_lm.py first")
    return quality.ModelSpec("lm", str(folder), str(folder / "heldout.txt"), samples=128, seq_len=128,
                             eval_samples=128, eval_seq_len=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("lm", "minilm"), default="lm")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--densities", default="0.5,0.4,0.3,2:4")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args()
    spec = spec_of(args.model)
    densities = [quality._parse_density(text) for text in args.densities.split(",")]
    dense = load_adapter(spec.reference)
    cache: dict = {}
    metric = "cosine" if args.model == "minilm" else "perplexity"
    rows = []
    for calibration_set in range(args.sets):
        texts = builtin_texts(spec.samples, offset=calibration_set * spec.samples)
        calibration = tokenize_texts(dense.tokenizer, texts, spec.seq_len)
        for density in densities:
            row = {"set": calibration_set, "density": str(density)}
            for method in METHODS:
                result = quality._prune_and_score(spec, dense, calibration, quality.bench_overrides(method), density,
                                                  0, cache)
                row[method] = result[metric]
            anchors = {method: row[method] for method in METHODS[1:]}
            best = (max if metric == "cosine" else min)(anchors, key=anchors.get)
            row["best_anchor"], row["margin"] = best, row["icbs-quality"] - anchors[best]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| density | set | {' | '.join(METHODS)} | preset − best anchor |")
    print("|---|---|" + "---|" * len(METHODS) + "---|")
    for row in sorted(rows, key=lambda r: (densities.index(quality._parse_density(r["density"])), r["set"])):
        print(f"| {row['density']} | {row['set']} | " + " | ".join(f"{row[m]:.4f}" for m in METHODS)
              + f" | {row['margin']:+.4f} ({row['best_anchor']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "metric": metric, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
