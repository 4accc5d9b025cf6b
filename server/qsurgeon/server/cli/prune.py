"""CLI commands ``qsurgeon prune`` and ``qsurgeon demo``.

Both are thin: they turn arguments into :class:`~qsurgeon.client.options.PruneOptions`
(whose fields declare the flags)
and call :func:`~qsurgeon.server.engine.run.run_prune` with the in-process queue, exactly
what the service runs with a Redis queue. Errors in the options are UsageErrors, which
the CLI frame prints as one line with exit code 2 — before anything is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

from qsurgeon.client.cli.arguments import add_option_arguments, explicit_values
from qsurgeon.client.options import PruneOptions, build_options


#: the demo's settings: 50 % per row with iCBS on MiniLM (about 30 s of iCBS search on 2 cores)
DEMO_SETTINGS: dict[str, Any] = {
    "model": "builtin:minilm", "method": "icbs", "density": 0.5, "block_size": 128, "epochs": 1,
    "samples": 128, "seq_len": 128, "seed": 0,
}
DEMO_EVAL_TEXTS = 256
#: what the demo's banner promises; measured with `time qsurgeon demo` (warm kernel cache), see the README
DEMO_DURATION = "30-50 s on 2 idle cores, up to two minutes on busy ones"


def register(subparsers: Any) -> None:
    prune = subparsers.add_parser(
        "prune",
        help="prune a model with iCBS, Wanda or magnitude",
        description="Prune every linear of a Hugging Face model (safetensors folder or builtin:minilm) to a "
        "density or an N:M pattern; write the pruned model, its masks and report.json to --out.",
    )
    prune.add_argument("model", metavar="MODEL", help=PruneOptions.model_fields["model"].description)
    prune.add_argument("--out", required=True, help=PruneOptions.model_fields["out"].description)
    prune.add_argument("--checkpoint", default=None, metavar="DIR",
                       help="save resumable state to DIR after every round; rerun the same command to resume")
    prune.add_argument("--json", action="store_true", help="print report.json on stdout")
    add_option_arguments(prune)
    prune.add_argument("--quiet", action="store_true", help="no progress on stderr")
    prune.set_defaults(func=run_prune_command)

    demo = subparsers.add_parser(
        "demo",
        help="prune all-MiniLM-L6-v2 to 50%% with iCBS and compare with the dense model",
        description="Prune the built-in all-MiniLM-L6-v2 to 50%% density with iCBS (in-process) and print how "
        "close its sentence embeddings stay to the dense model's, against Wanda.",
    )
    demo.add_argument("--out", default=None, help="where to write the pruned model (default: nothing is saved)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.set_defaults(func=run_demo_command)


def options_from_args(args: argparse.Namespace) -> PruneOptions:
    """PruneOptions: every option the user gave, over the preset's values (if any), over the defaults."""
    explicit = {"model": args.model, "out": args.out, **explicit_values(args)}
    preset = explicit.pop("preset", None)
    return build_options(explicit, preset, flag_style=True)


def run_prune_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsurgeon.server.engine.outputs import check_out_folder, report_json
    from qsurgeon.server.engine.checkpoint import DirectoryCheckpoint
    from qsurgeon.server.engine.run import run_prune
    from qsurgeon.server.engine.progress import ProgressBar, kernel_compile_notice

    options = options_from_args(args)
    check_out_folder(options.out)
    checkpoint = DirectoryCheckpoint(args.checkpoint) if args.checkpoint else None
    progress = None if args.quiet else ProgressBar(
        notice=kernel_compile_notice(options.method, options.objective, options.solver))
    result = run_prune(options, progress=progress, checkpoint=checkpoint)
    if args.json:
        print(report_json(result.report))
    else:
        print(summary_line(result.report["summary"], result.out))
    return 0


def summary_line(summary: dict[str, Any], out: Any) -> str:
    """The line ``qsurgeon prune`` ends with: what was pruned, the layer error it reached, where it went."""
    error = f"relative layer error {summary['relative_error_initial']:.4f} -> {summary['relative_error_final']:.4f}"
    if "relative_error_refit" in summary:  # --refit (both quality presets): least squares on the kept weights
        error += f" (mask), {summary['relative_error_refit']:.4f} after refit"
    return (f"pruned {summary['tensors']} tensors to {summary['sparsity']} (density {summary['density']:.4f}); "
            f"{error}; wrote {out}")


def run_demo(out: str | None = None, progress: Any = None) -> dict[str, Any]:
    """Prune MiniLM with iCBS and compare with Wanda and the dense model on held-out text.

    The iCBS-pruned model is written to ``out`` if given; otherwise nothing is written
    (``"out"`` is None in the result) and nothing is left behind.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from qsurgeon.server.models.loading import load_adapter
    from qsurgeon.server.models.text import HFTextAdapter
    from qsurgeon.server.models.calibration import builtin_texts, load_calibration
    from qsurgeon.server.evaluate.embeddings import embedding_agreement
    from qsurgeon.server.engine.run import run_prune

    started = time.perf_counter()
    dense = load_adapter("builtin:minilm")
    texts = builtin_texts(DEMO_EVAL_TEXTS, "heldout")
    calibration = load_calibration("builtin", dense.tokenizer, DEMO_SETTINGS["samples"], DEMO_SETTINGS["seq_len"])

    def fresh_copy() -> HFTextAdapter:  # the model is loaded once; each method prunes its own copy
        adapter = HFTextAdapter(copy.deepcopy(dense.model), dense.tokenizer, dense.kind)
        adapter.source = dense.source  # the saved folder keeps sentence-transformers' modules
        return adapter

    result = run_prune(PruneOptions(**DEMO_SETTINGS, out=str(out) if out else None), adapter=fresh_copy(),
                       calibration=calibration, progress=progress)
    icbs = embedding_agreement(dense.model, result.adapter.model, dense.tokenizer, texts)
    wanda = run_prune(PruneOptions(**{**DEMO_SETTINGS, "method": "wanda"}), adapter=fresh_copy(), calibration=calibration)
    wanda_agreement = embedding_agreement(dense.model, wanda.adapter.model, dense.tokenizer, texts)
    summary = result.report["summary"]
    return {
        "model": "all-MiniLM-L6-v2", "density": summary["density"], "tensors": summary["tensors"],
        "out": str(result.out) if result.out is not None else None, "heldout_texts": len(texts),
        "icbs": {**icbs, "relative_layer_error": summary["relative_error_final"],
                 "seconds_icbs": result.report["seconds"]["icbs"], "seconds_total": result.report["seconds"]["total"]},
        "wanda": {**wanda_agreement, "relative_layer_error": wanda.report["summary"]["relative_error_final"]},
        "seconds": time.perf_counter() - started,
    }


def run_demo_command(args: argparse.Namespace) -> int:
    if args.out is not None:
        from qsurgeon.server.engine.outputs import check_out_folder

        check_out_folder(args.out)
    print(f"qsurgeon demo: pruning all-MiniLM-L6-v2 to 50% with iCBS, then with Wanda to compare "
          f"({DEMO_DURATION}, once the kernels are compiled)", file=sys.stderr)
    from qsurgeon.server.engine.progress import ProgressBar, kernel_compile_notice

    notice = kernel_compile_notice(DEMO_SETTINGS["method"])
    result = run_demo(args.out, progress=ProgressBar(notice=notice))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    icbs, wanda = result["icbs"], result["wanda"]
    print(f"all-MiniLM-L6-v2, {result['tensors']} linears pruned to density {result['density']:.3f}")
    print(f"{'':8} {'cosine to dense':>16} {'retrieval@1':>12} {'layer error':>12}")
    for name, row in (("Wanda", wanda), ("iCBS", icbs)):
        print(f"{name:8} {row['cosine']:16.4f} {row['retrieval_at_1']:12.3f} {row['relative_layer_error']:12.4f}")
    print(f"iCBS pruning took {icbs['seconds_icbs']:.1f} s of search ({icbs['seconds_total']:.1f} s in all); "
          f"demo {result['seconds']:.1f} s.")
    if result["out"] is not None:
        print(f"Pruned model written to {result['out']}")
    else:
        print("The pruned model was not saved (nothing written to disk); run qsurgeon demo --out DIR to keep it.")
    return 0
