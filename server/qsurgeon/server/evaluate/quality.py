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

The second half is ``qsurgeon bench quality``: every method of the pipeline on MiniLM and
a small causal LM at several densities, scored with the same evaluation, written as a
markdown table, JSON and plots. It lives here because it is nothing but repeated
``run_prune`` + :func:`evaluate_pair` calls.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.adapters import ModelAdapter
from qsurgeon.server.models.calibration import builtin_texts, read_text_file
from qsurgeon.server.evaluate.embeddings import agreement, sentence_embeddings
from qsurgeon.server.evaluate.perplexity import perplexity, token_windows

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


# ====================================================================== the quality benchmark
# ``qsurgeon bench quality``: every method on MiniLM and a small causal LM, one run.

#: the benchmark's densities; a string is an N:M pattern
DENSITIES: tuple[float | str, ...] = (0.5, 0.4, 0.3, "2:4")
QUICK_DENSITIES: tuple[float | str, ...] = (0.5, "2:4")

#: the iCBS settings of the benchmark's iCBS rows (and of the quality preset)
ICBS_EPOCHS = 2
#: calibration samples of the quality preset (and of the benchmark's MiniLM runs): the
#: largest lever measured — 128 → 256 samples added 0.014 of cosine at density 0.5
QUALITY_SAMPLES = 256
#: ``--preset NAME``: defaults for PruneOptions that explicit options override. Chosen
#: from this benchmark's measurements (docs/results.md): ``quality`` is the best iCBS
#: combination measured — one epoch from SparseGPT's mask, then refit, at coverage 1/6
#: (1/3 scored the same — 0.9497 vs 0.9496 at density 0.5, 0.909 / 0.841 / 0.903 vs
#: 0.909 / 0.843 / 0.903 at 0.4 / 0.3 / 2:4 — with 20 % more blocks: only the 1536-wide
#: rows get fewer; a second epoch, damping 0.001 and blocks of 64 were all within
#: ±0.0015, the run-to-run spread);
#: ``fast`` is Wanda plus one epoch of iCBS, no refit.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"method": "icbs", "init": "wanda", "epochs": 1, "refit": False},
    "quality": {"method": "icbs", "init": "sparsegpt", "epochs": 1, "refit": True, "samples": QUALITY_SAMPLES,
                "coverage": 1 / 6},
}
#: What a preset changes for one model kind (see :func:`adapters.model_kind`). Causal LMs:
#: on the benchmark LM, calibrated on text unlike its own, blocks of 128 move far from
#: the start and fit the calibration text (perplexity worse than Wanda + refit at every
#: density); blocks of 8 from Wanda's mask, refit damping 0.001, beat SparseGPT and Wanda
#: + refit at every density on 3 seeds (docs/results.md). On MiniLM those settings give
#: 0.9425 at density 0.5 instead of 0.950, hence per kind.
PRESETS_BY_KIND: dict[str, dict[str, dict[str, Any]]] = {
    "quality": {"causal-lm": {"init": "wanda", "block_size": 8, "damp": 0.001, "coverage": 1 / 3}},
}
#: method label -> PruneOptions overrides; "icbs-quality" is exactly ``--preset quality`` (with its
#: per-kind changes, :func:`bench_overrides`)
BENCH_METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda+refit": {"method": "wanda", "refit": True},
    "icbs": {"method": "icbs", "init": "wanda", "epochs": ICBS_EPOCHS},
    "icbs+refit": {"method": "icbs", "init": "wanda", "epochs": ICBS_EPOCHS, "refit": True},
    "icbs-quality": dict(PRESETS["quality"]),
}


def apply_preset(preset: str | None, explicit: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """PruneOptions values: the preset's, its changes for the model ``kind``, then every
    explicitly given option on top.

    ``explicit`` must hold only the options the user actually set (not argparse defaults),
    so ``--preset quality --epochs 4`` runs the quality preset with four epochs.
    """
    if preset is None:
        return dict(explicit)
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **PRESETS_BY_KIND.get(preset, {}).get(kind or "", {}), **explicit}


def bench_overrides(method: str, kind: str) -> dict[str, Any]:
    """A benchmark method's PruneOptions overrides for a model of ``kind``."""
    if method == "icbs-quality":  # exactly what ``--preset quality`` runs on this model
        return apply_preset("quality", {}, kind)
    return dict(BENCH_METHODS[method])


#: epochs at which the quality-vs-time curve is sampled (0 = the Wanda start)
CURVE_EPOCHS: tuple[int, ...] = (0, 1, 2, 4, 8)
QUICK_CURVE_EPOCHS: tuple[int, ...] = (0, 1)

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_LM = REPO_ROOT / "benchmarks" / "cache" / "tiny-gpt2"


@dataclass
class ModelSpec:
    """One model of the benchmark and how to calibrate, prune and score it."""

    key: str
    reference: str
    data: str  # evaluation text: builtin or a file
    samples: int  # calibration samples
    seq_len: int
    eval_samples: int
    eval_seq_len: int
    include: list[str] = field(default_factory=list)


@dataclass
class BenchOptions:
    out: Path
    quick: bool = False
    lm: str | None = None
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))
    models: list[str] = field(default_factory=lambda: ["minilm", "lm"])
    densities: list[float | str] | None = None  # default: DENSITIES (QUICK_DENSITIES with quick)
    curve_epochs: list[int] | None = None  # default: CURVE_EPOCHS (QUICK_CURVE_EPOCHS with quick)
    seed: int = 0

    @classmethod
    def from_cli(cls, args: Any) -> "BenchOptions":
        methods = _split_list(args.methods, BENCH_METHODS, "method") if args.methods else list(BENCH_METHODS)
        models = _split_list(args.models, ("minilm", "lm"), "model") if args.models else ["minilm", "lm"]
        out = Path(args.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {args.out!r} exists and is not a folder")
        if args.lm is not None and not Path(args.lm).expanduser().is_dir():
            raise UsageError(f"--lm {args.lm!r} is not a folder")
        densities = None
        if getattr(args, "densities", None):
            densities = [_parse_density(item) for item in args.densities.split(",") if item.strip()]
        curve_epochs = None
        if getattr(args, "curve_epochs", None):
            try:
                curve_epochs = [int(item) for item in args.curve_epochs.split(",")]
            except ValueError:
                raise UsageError(f"--curve-epochs must be comma-separated integers, got {args.curve_epochs!r}") from None
            if any(epochs < 0 for epochs in curve_epochs):
                raise UsageError("--curve-epochs must be non-negative")
        return cls(out=out, quick=bool(args.quick), lm=args.lm, methods=methods, models=models,
                   densities=densities, curve_epochs=curve_epochs)


def _parse_density(text: str) -> float | str:
    """``0.5`` -> 0.5, ``2:4`` -> "2:4"; checked by Sparsity so errors read the same everywhere."""
    from qsurgeon.server.pruning.sparsity import Sparsity

    text = text.strip()
    if ":" in text:
        Sparsity.parse(None, text)
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--densities entries must be numbers or N:M patterns, got {text!r}") from None
    Sparsity(value)
    return value


def _split_list(text: str, allowed: Any, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise UsageError(f"unknown {what}(s) {', '.join(unknown) or text!r}; choose from: {', '.join(allowed)}")
    return items


def _density_fields(density: float | str) -> dict[str, Any]:
    return {"pattern": density} if isinstance(density, str) else {"density": density}


def _expected_density(adapter: Any, density: float | str) -> dict[str, float]:
    """What every prunable tensor's density must be for a (row-granular) spec."""
    from qsurgeon.server.pruning.sparsity import Sparsity

    sparsity = Sparsity.parse(None, density) if isinstance(density, str) else Sparsity(float(density))
    expected = {}
    for target in adapter.all_targets():
        _, width = target.shape
        expected[target.parameter_name] = (width - sparsity.pruned_per_group(width)) / width if sparsity.pattern is None \
            else sparsity.pattern[0] / sparsity.pattern[1]
    return expected


def _pattern_ok(adapter: Any, density: float | str) -> bool:
    """For N:M, check every group of M really keeps N (non-zeros), not just the average."""
    if not isinstance(density, str):
        return True
    n_keep, m = (int(v) for v in density.split(":"))
    for target in adapter.all_targets():
        weight = target.weight()
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=2)
        if bool((groups > n_keep).any()):
            return False
    return True


def _model_specs(options: BenchOptions, log: Callable[[str], None]) -> list[ModelSpec]:
    specs = []
    if "minilm" in options.models:
        if options.quick:
            # first transformer layer only, few short samples: structure, not quality
            specs.append(ModelSpec("minilm", "builtin:minilm", "builtin", samples=8, seq_len=32, eval_samples=16,
                                   eval_seq_len=32, include=["encoder.layer.0.attention.self.query"]))
        else:
            # 256 calibration samples, as ``--preset quality`` uses: 64 → 128 → 256 took the
            # quality preset from 0.927 to 0.936 to 0.950 cosine at density 0.5 (docs/results.md)
            specs.append(ModelSpec("minilm", "builtin:minilm", "builtin", samples=QUALITY_SAMPLES, seq_len=128,
                                   eval_samples=256, eval_seq_len=128))
    if "lm" in options.models:
        folder = _lm_folder(options, log)
        if folder is not None:
            heldout = folder / "heldout.txt"
            data = str(heldout) if heldout.is_file() else "builtin"
            if options.quick:
                specs.append(ModelSpec("lm", str(folder), data, samples=8, seq_len=32, eval_samples=4, eval_seq_len=32))
            else:
                specs.append(ModelSpec("lm", str(folder), data, samples=128, seq_len=128, eval_samples=128,
                                       eval_seq_len=128))
    return specs


def _lm_folder(options: BenchOptions, log: Callable[[str], None]) -> Path | None:
    """``--lm``, else the cached benchmark LM, else train it (full runs only)."""
    if options.lm is not None:
        return Path(options.lm).expanduser()
    if (DEFAULT_LM / "model.safetensors").is_file():
        return DEFAULT_LM
    script = REPO_ROOT / "benchmarks" / "train_lm.py"
    if options.quick or not script.is_file():
        log("bench quality: no --lm and no cached benchmark LM; skipping the causal LM "
            "(run benchmarks/train_lm.py or pass --lm DIR)")
        return None
    log(f"bench quality: training the benchmark LM once ({script.name}, about 5 minutes)")
    subprocess.run([sys.executable, str(script), "--out", str(DEFAULT_LM)], check=True)
    return DEFAULT_LM


def _prune_and_score(spec: ModelSpec, dense: Any, calibration: Any, overrides: dict[str, Any],
                     density: float | str, seed: int, dense_cache: dict[Any, Any]) -> dict[str, Any]:
    """Prune a copy of the dense model (loaded once; copying is far cheaper than loading)."""
    import copy

    from qsurgeon.server.engine.run import PruneOptions, run_prune

    # the benchmark calibrates each model once (``calibration``), so the spec's sample count
    # wins over a preset's: the quality preset's ``samples`` would otherwise be reported
    # for data it did not get
    overrides = {key: value for key, value in overrides.items() if key != "samples"}
    options = PruneOptions(model=spec.reference, samples=spec.samples, seq_len=spec.seq_len, seed=seed,
                           include=list(spec.include), **_density_fields(density), **overrides)
    started = time.perf_counter()
    result = run_prune(options, adapter=copy.deepcopy(dense), calibration=calibration)
    wall = time.perf_counter() - started
    seconds = result.report["seconds"]
    prune_seconds = sum(seconds.get(phase, 0.0) for phase in ("calibrate", "init", "icbs", "refit"))
    evaluation = evaluate_pair(dense, result.adapter, data=spec.data, samples=spec.eval_samples,
                               seq_len=spec.eval_seq_len, dense_cache=dense_cache)
    expected = _expected_density(result.adapter, density)
    achieved = evaluation["densities"]
    density_ok = all(abs(achieved[name] - expected[name]) < 1e-9 for name in expected) and _pattern_ok(result.adapter, density)
    row = {
        "density_spec": density,
        "density": evaluation["density"],
        "density_ok": density_ok,
        "prune_seconds": prune_seconds,
        "wall_seconds": wall,
        "relative_layer_error": result.report["summary"].get("relative_error_refit",
                                                              result.report["summary"]["relative_error_final"]),
    }
    for key in ("cosine", "retrieval_at_1", "perplexity", "dense_perplexity"):
        if key in evaluation:
            row[key] = evaluation[key]
    return row


def _metric_key(spec: ModelSpec, dense: Any) -> str:
    return "perplexity" if default_task(dense) == "perplexity" else "cosine"


def run_quality_bench(options: BenchOptions, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run the benchmark; write ``results.json``, ``results.md`` and PNG plots into ``options.out``."""
    from qsurgeon.server.models.adapters import load_adapter
    from qsurgeon.server.models.calibration import load_calibration

    options.out.mkdir(parents=True, exist_ok=True)
    densities = options.densities or (QUICK_DENSITIES if options.quick else DENSITIES)
    curve_epochs = options.curve_epochs if options.curve_epochs is not None else (
        QUICK_CURVE_EPOCHS if options.quick else CURVE_EPOCHS)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "qsurgeon bench quality" + (" --quick" if options.quick else "")
        + (f" --lm {options.lm}" if options.lm else "")
        + (f" --models {','.join(options.models)}" if options.models != ["minilm", "lm"] else "")
        + (f" --densities {','.join(map(str, options.densities))}" if options.densities else "")
        + (f" --curve-epochs {','.join(map(str, options.curve_epochs))}" if options.curve_epochs is not None else ""),
        "quick": options.quick,
        "methods": {name: BENCH_METHODS[name] for name in options.methods},
        "densities": list(densities),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "machine": platform.machine()},
        "models": {},
    }
    for spec in _model_specs(options, log):
        dense = load_adapter(spec.reference, include=spec.include)
        calibration = load_calibration("builtin", dense.tokenizer, spec.samples, spec.seq_len)
        dense_cache: dict[Any, Any] = {}
        metric = _metric_key(spec, dense)
        entry: dict[str, Any] = {"reference": spec.reference, "metric": metric, "spec": asdict(spec), "rows": [],
                                 "curve": []}
        results["models"][spec.key] = entry
        for density in densities:
            for method in options.methods:
                log(f"bench quality: {spec.key} {density} {method}")
                overrides = bench_overrides(method, dense.kind)
                if options.quick and "epochs" in overrides:
                    overrides["epochs"] = 1  # structure, not quality: one epoch is enough
                row = _prune_and_score(spec, dense, calibration, overrides, density, options.seed, dense_cache)
                entry["rows"].append({"method": method, **row})
                _write_partial(results, options.out, started)
        for refit in (False, True):
            for epochs in curve_epochs:
                log(f"bench quality: {spec.key} curve epochs={epochs} refit={refit}")
                overrides = {"method": "icbs", "init": "wanda", "epochs": epochs, "refit": refit}
                row = _prune_and_score(spec, dense, calibration, overrides, densities[0], options.seed, dense_cache)
                entry["curve"].append({"epochs": epochs, "refit": refit, **row})
                _write_partial(results, options.out, started)
        if metric == "perplexity":
            entry["dense_perplexity"] = entry["rows"][0].get("dense_perplexity") if entry["rows"] else None
        results["models"][spec.key] = entry
    results["seconds"] = time.perf_counter() - started
    (options.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots = write_plots(results, options.out)
    (options.out / "results.md").write_text(results_markdown(results, plots))
    return results


# ---------------------------------------------------------------------- report writers
def _write_partial(results: dict[str, Any], out: Path, started: float) -> None:
    """Keep results.json/.md current after every run, so a long benchmark can be read while it runs."""
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(results, []))


def _cell(row: dict[str, Any], metric: str) -> str:
    value = row.get(metric)
    if value is None:
        return "–"
    text = f"{value:.3f}" if metric == "cosine" else f"{value:.1f}"
    return text if row.get("density_ok", True) else f"{text} (density off!)"


def results_markdown(results: dict[str, Any], plots: list[str]) -> str:
    lines = [f"# Quality benchmark{' (quick)' if results['quick'] else ''}", "",
             f"Command: `{results['command']} --out DIR`  ", f"Total time: {results['seconds']:.0f} s", ""]
    for key, entry in results["models"].items():
        metric = entry["metric"]
        densities = [str(d) for d in results["densities"]]
        dense_ppl = next((row["dense_perplexity"] for row in entry["rows"] if "dense_perplexity" in row), float("nan"))
        what = "mean cosine to the dense model's sentence embeddings (higher is better)" if metric == "cosine" \
            else f"held-out perplexity (lower is better; dense {dense_ppl:.1f})"
        lines += [f"## {key}: {entry['reference']}", "", f"Metric: {what}.", "",
                  "| method | " + " | ".join(densities) + " | prune seconds |",
                  "|---|" + "---|" * (len(densities) + 1)]
        by_method: dict[str, dict[str, dict[str, Any]]] = {}
        for row in entry["rows"]:
            by_method.setdefault(row["method"], {})[str(row["density_spec"])] = row
        for method, cells in by_method.items():
            seconds = "/".join(f"{cells[d]['prune_seconds']:.0f}" for d in densities if d in cells)
            lines.append(f"| {method} | " + " | ".join(_cell(cells[d], metric) if d in cells else "–" for d in densities)
                         + f" | {seconds} |")
        ok = all(row["density_ok"] for row in entry["rows"] + entry["curve"])
        lines += ["", f"Every method achieved its density exactly: {'yes' if ok else 'NO'}.", ""]
        if entry["curve"]:
            lines += [f"iCBS from Wanda at density {results['densities'][0]}, epoch by epoch (epoch 0 = Wanda):", "",
                      "| epochs | refit | " + metric + " | prune seconds | relative layer error |", "|---|---|---|---|---|"]
            for row in entry["curve"]:
                lines.append(f"| {row['epochs']} | {'yes' if row['refit'] else 'no'} | {_cell(row, metric)} | "
                             f"{row['prune_seconds']:.1f} | {row['relative_layer_error']:.4f} |")
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out: Path) -> list[str]:
    """Metric vs density per method, and iCBS quality vs seconds; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    for key, entry in results["models"].items():
        metric = entry["metric"]
        figure, axis = plt.subplots(figsize=(6, 4))
        by_method: dict[str, list[dict[str, Any]]] = {}
        for row in entry["rows"]:
            by_method.setdefault(row["method"], []).append(row)
        for index, (method, rows) in enumerate(by_method.items()):
            colour = f"C{index}"
            curve = sorted((r for r in rows if not isinstance(r["density_spec"], str)), key=lambda r: r["density_spec"])
            axis.plot([r["density_spec"] for r in curve], [r[metric] for r in curve], "o-", color=colour, label=method)
            for r in rows:
                if isinstance(r["density_spec"], str):
                    axis.plot([0.5], [r[metric]], "*", markersize=11, color=colour)
        axis.set_xlabel("density (★ = 2:4 at 0.5)")
        written.append(_save_plot(figure, axis, metric, f"{key}: {metric} vs density",
                                  out / f"{key}_quality_vs_density.png"))
        if entry["curve"]:
            figure, axis = plt.subplots(figsize=(6, 4))
            for refit, marker in ((False, "o-"), (True, "s-")):
                rows = [r for r in entry["curve"] if r["refit"] == refit]
                axis.plot([r["prune_seconds"] for r in rows], [r[metric] for r in rows], marker,
                          label=f"iCBS from Wanda{' + refit' if refit else ''}")
                for r in rows:
                    axis.annotate(str(r["epochs"]), (r["prune_seconds"], r[metric]), fontsize=7,
                                  xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel("pruning seconds (labels: epochs; 0 = Wanda)")
            written.append(_save_plot(figure, axis, metric,
                                      f"{key}: iCBS quality vs time at density {results['densities'][0]}",
                                      out / f"{key}_icbs_vs_seconds.png"))
    return written


def _save_plot(figure: Any, axis: Any, metric: str, title: str, path: Path) -> str:
    """Label the metric axis (log scale for perplexity), title, legend, grid; save; return the file name."""
    import matplotlib.pyplot as plt

    axis.set_ylabel(metric)
    if metric == "perplexity":
        axis.set_yscale("log")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
