"""Prune the digits DeiT with magnitude, Wanda, SparseGPT and iCBS; report held-out top-1.

Uses the model and splits that ``benchmarks/train_vit.py`` caches (it trains first if the
cache is empty). Every method prunes all encoder linears (the heads stay dense) with the
same 128 calibration images from the TRAINING split (``npz:calibration.npz``, through the
same ``run_prune`` the CLI uses), at densities 0.5 / 0.4 / 0.3 and the 2:4 pattern; top-1
is measured on the held-out test split, which neither training nor calibration saw.

Writes ``benchmarks/out/prune_vit.json`` and ``benchmarks/out/prune_vit.png`` and prints
a Markdown table. Nothing here is specific to this model except the cache path: pass
``--model/--calibration/--test`` to benchmark another image classifier.

Run: ``.venv/bin/python benchmarks/prune_vit.py [--methods magnitude,wanda,sparsegpt,icbs]``.
A method may name iCBS's block solver, ``icbs@auto`` or ``icbs+refit@sa`` (plain ``icbs``:
the prune default), to compare solvers on the same calibration and test data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (docs/solvers.md)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SETTINGS: list[tuple[str, dict]] = [
    ("0.5", {"density": 0.5}),
    ("0.4", {"density": 0.4}),
    ("0.3", {"density": 0.3}),
    ("2:4", {"pattern": "2:4"}),
]
LABELS = {
    "magnitude": "magnitude",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT (updates weights)",
    "icbs": "iCBS (mask only)",
    "icbs+refit": "iCBS + refit",
}


def ensure_model() -> Path:
    sys.path.insert(0, str(HERE))
    import train_vit

    if not (train_vit.CACHE / "model" / "model.safetensors").exists() or not (train_vit.CACHE / "test.npz").exists():
        print("training the digits DeiT first (benchmarks/train_vit.py)...", flush=True)
        train_vit.train(epochs=35, batch_size=64, lr=7e-4)
    return train_vit.CACHE


def prune_once(model: str, method: str, setting: dict, calibration: str, out: Path, args) -> dict:
    from qsurgeon.server.engine.run import PruneOptions, run_prune

    method, _, solver = method.partition("@")
    refit = method.endswith("+refit")
    options = PruneOptions(
        model=model, method=method.removesuffix("+refit"), calibration=calibration, samples=args.samples,
        block_size=args.block_size, epochs=args.epochs, seed=args.seed, out=str(out), refit=refit,
        batch_size=32, **setting, **({"solver": solver} if solver else {}),
    )
    started = time.perf_counter()
    result = run_prune(options)
    summary = result.report["summary"]
    return {
        "seconds": time.perf_counter() - started,
        "relative_error": summary.get("relative_error_refit", summary["relative_error_final"]),
        "density": summary["density"],
    }


def plot(rows: list[dict], dense_top1: float, path: Path, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    densities = [0.5, 0.4, 0.3]
    for method in methods:
        values = [next(r["top1"] for r in rows if r["method"] == method and r["setting"] == f"{d:g}") for d in densities]
        left.plot(densities, values, marker="o", label=LABELS.get(method, method))
    left.axhline(dense_top1, color="grey", linestyle="--", label=f"dense {dense_top1:.3f}")
    left.set_xlabel("density (fraction of encoder weights kept)")
    left.set_ylabel("held-out top-1")
    left.invert_xaxis()
    left.set_title("unstructured, per row")
    left.legend(fontsize=8)
    pattern = [next(r["top1"] for r in rows if r["method"] == method and r["setting"] == "2:4") for method in methods]
    right.bar(range(len(methods)), pattern, color=[f"C{i}" for i in range(len(methods))])
    right.axhline(dense_top1, color="grey", linestyle="--")
    right.set_xticks(range(len(methods)), [LABELS.get(m, m).split(" (")[0] for m in methods], rotation=30, fontsize=8)
    right.set_ylim(min(pattern + [dense_top1]) - 0.1, 1.0)
    right.set_title("2:4")
    figure.suptitle("DeiT on sklearn digits: test top-1 after pruning every encoder linear")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the cached digits DeiT)")
    parser.add_argument("--calibration", default=None, help="calibration spec (default: npz:<cache>/calibration.npz)")
    parser.add_argument("--test", default=None, help="labelled test data (default: <cache>/test.npz)")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,icbs,icbs+refit")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="prune_vit", help="output file stem under benchmarks/out/ (default prune_vit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qsurgeon.server.evaluate.classification import evaluate_classification
    from qsurgeon.server.engine.methods import METHODS

    cache = ensure_model() if args.model is None else None
    model = args.model or str(cache / "model")
    calibration = args.calibration or f"npz:{cache / 'calibration.npz'}"
    test = args.test or str(cache / "test.npz")
    methods = [m for m in args.methods.split(",") if m.partition("@")[0].removesuffix("+refit") in METHODS]
    skipped = [m for m in args.methods.split(",") if m not in methods]
    if skipped:
        print(f"skipping unregistered method(s): {', '.join(skipped)}")

    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    dense_top1 = None
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        for label, setting in SETTINGS:
            for method in methods:
                out = Path(scratch) / f"{method.replace('@', '_')}-{label.replace(':', '_')}"
                pruned = prune_once(model, method, setting, calibration, out, args)
                scores = evaluate_classification(model, out, test)
                dense_top1 = scores["dense"]["top1"]
                row = {"method": method, "setting": label, "top1": scores["pruned"]["top1"],
                       "top5": scores["pruned"].get("top5"), "agreement": scores["agreement"], **pruned}
                rows.append(row)
                print(f"{label:>4} {method:<11} top-1 {row['top1']:.4f}  agreement {row['agreement']:.4f}  "
                      f"layer error {row['relative_error']:.4f}  {row['seconds']:.1f} s", flush=True)

    lines = ["| method | " + " | ".join(label for label, _ in SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
    for method in methods:
        cells = [f"{next(r['top1'] for r in rows if r['method'] == method and r['setting'] == label):.3f}" for label, _ in SETTINGS]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    lines.append(f"| dense | " + " | ".join(f"{dense_top1:.3f}" for _ in SETTINGS) + " |")
    lines += ["", "relative layer-wise error on the calibration images:", "",
              "| method | " + " | ".join(label for label, _ in SETTINGS) + " |", "|---" * (len(SETTINGS) + 1) + "|"]
    for method in methods:
        cells = [f"{next(r['relative_error'] for r in rows if r['method'] == method and r['setting'] == label):.4f}"
                 for label, _ in SETTINGS]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nheld-out top-1 ({test}, calibration {calibration}, iCBS B={args.block_size}, {args.epochs} epochs)\n")
    print(table)

    result = {"model": model, "calibration": calibration, "test": test, "dense_top1": dense_top1,
              "block_size": args.block_size, "epochs": args.epochs, "samples": args.samples, "seed": args.seed,
              "rows": rows, "table_markdown": table}
    (OUT / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
    plot(rows, dense_top1, OUT / f"{args.tag}.png", methods)
    print(f"\nwrote {OUT / f'{args.tag}.json'} and {OUT / f'{args.tag}.png'}")


if __name__ == "__main__":
    main()
