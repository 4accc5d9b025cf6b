"""The verdict tables of docs/results.md, read from one ``qsurgeon bench quality`` run's results.json.

    python benchmarks/quality_verdict.py benchmarks/out/quality_s4/results.json [--json verdict.json]

Prints, as Markdown: MiniLM's held-out cosine of the quality preset against ALPS (the ADMM
anchor) and issue #16's targets, with the prune seconds; the causal LM's held-out perplexity of
the preset against every anchor (ALPS, Wanda + refit, SparseGPT). Writes the same numbers as
JSON with ``--json``. Nothing is re-measured: the tables are the run's own figures, to 4–5 digits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: issue #16's MiniLM targets (held-out cosine) per density
TARGETS = {"0.5": 0.960, "0.4": 0.930, "0.3": 0.870, "2:4": 0.920}
PRESET = "icbs-quality"
ANCHORS_LM = ("alps", "wanda+refit", "sparsegpt")


def _rows(model: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["method"], str(row["density_spec"])): row for row in model["rows"]}


def minilm_verdict(model: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _rows(model)
    table = []
    for density, target in TARGETS.items():
        preset, alps = rows.get((PRESET, density)), rows.get(("alps", density))
        if preset is None or alps is None:
            continue
        matched = rows.get(("alps+match-dense", density))
        table.append({"density": density, "alps": alps["cosine"], "preset": preset["cosine"],
                      "alps_match_dense": matched["cosine"] if matched else None,
                      "difference": preset["cosine"] - alps["cosine"], "target": target,
                      "short_by": max(0.0, target - preset["cosine"]),
                      "seconds_preset": preset["prune_seconds"], "seconds_alps": alps["prune_seconds"]})
    return table


def lm_verdict(model: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _rows(model)
    table = []
    for density in TARGETS:
        preset = rows.get((PRESET, density))
        anchors = {name: rows[(name, density)]["perplexity"] for name in ANCHORS_LM if (name, density) in rows}
        if preset is None or not anchors:
            continue
        best = min(anchors, key=anchors.get)
        table.append({"density": density, "preset": preset["perplexity"], **anchors, "best_anchor": best,
                      "margin": preset["perplexity"] - anchors[best]})
    return table


def markdown(minilm: list[dict[str, Any]], lm: list[dict[str, Any]]) -> str:
    lines = ["| density | ALPS | ALPS + `--match-dense` | `--preset quality` | preset − ALPS | target | short by | "
             "prune s (preset / ALPS) |", "|---|---|---|---|---|---|---|---|"]
    for row in minilm:
        matched = f"{row['alps_match_dense']:.5f}" if row["alps_match_dense"] is not None else "–"
        short = f"{row['short_by']:.5f}" if row["short_by"] > 0 else "met"
        lines.append(f"| {row['density']} | {row['alps']:.5f} | {matched} | **{row['preset']:.5f}** | "
                     f"{row['difference']:+.5f} | {row['target']:.3f} | {short} | "
                     f"{row['seconds_preset']:.1f} / {row['seconds_alps']:.1f} |")
    lines += ["", "| density | `--preset quality` | " + " | ".join(ANCHORS_LM) + " | best anchor | preset − best anchor |",
              "|---|---|" + "---|" * len(ANCHORS_LM) + "---|---|"]
    for row in lm:
        anchors = " | ".join(f"{row[name]:.3f}" if name in row else "–" for name in ANCHORS_LM)
        lines.append(f"| {row['density']} | **{row['preset']:.3f}** | {anchors} | {row['best_anchor']} | "
                     f"{row['margin']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results.json of one qsurgeon bench quality run")
    parser.add_argument("--json", help="also write the verdict as JSON here")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    models = results["models"]
    minilm = minilm_verdict(models["minilm"]) if "minilm" in models else []
    lm = lm_verdict(models["lm"]) if "lm" in models else []
    print(markdown(minilm, lm))
    if args.json:
        Path(args.json).write_text(json.dumps({"minilm": minilm, "lm": lm}, indent=2) + "\n")


if __name__ == "__main__":
    main()
