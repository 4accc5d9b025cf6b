"""How a prune grows with the model: every phase timed, its peak memory measured, against the plan.

Random-init Llama-architecture models (grouped-query attention, gated MLP; hidden 256 →
2048, a few blocks) are saved as safetensors folders and pruned with ``run_prune`` in a
fresh subprocess each (so one run's freed memory cannot hide the next one's peak). A
sampler thread reads the process's RSS every few milliseconds and charges it to the
phase that is running (``load``, ``calibrate``, ``init``, ``icbs``, ``refit``, ``save``);
on CUDA ``torch.cuda.max_memory_allocated`` is read per phase too. Then
:func:`qsurgeon.server.engine.plan.estimate` is asked for the same run (probe measured
once) and the ratio plan / measured printed per phase: the plan's constants were tuned
on this table (docs/scale.md). Memory is also split into what the model itself takes
(its weights and masks: host memory that must grow with it) and the rest, the working
set, which must not grow with depth.

    python benchmarks/scale.py                        # ~5 minutes on 2 cores
    python benchmarks/scale.py --widths 256 --depths 2 --samples 4 --seq-len 16   # seconds
    python benchmarks/scale.py --device cuda --widths 2048 --depths 16 ...      # see gpu_scale.sh

Writes benchmarks/out/scale.json (or $OUT/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHASES = ("load", "calibrate", "init", "icbs", "refit", "save")


def llama_config(hidden: int, depth: int, vocab: int = 4096, dtype: str = "float32"):
    """A Llama-3-shaped config at width ``hidden``: head dim 64, 4 query heads per KV head, MLP 3.5×."""
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_hidden_layers=depth,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=False, dtype=dtype)


def build_model_folder(folder: Path, hidden: int, depth: int, vocab: int, dtype: str = "float32", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(hidden, depth, vocab, dtype)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def token_file(path: Path, samples: int, seq_len: int, vocab: int, seed: int = 0) -> Path:
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, vocab, (samples, seq_len), dtype=np.int64)
    np.save(path, ids)
    return path


class PhaseMemory:
    """RSS sampled every ``interval`` seconds, the peak charged to the running phase."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.phase = "setup"
        self.peak: dict[str, int] = {}
        self.device_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        rss = self.process.memory_info().rss
        self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
        self.phase = phase
        self.peak[phase] = max(self.peak.get(phase, 0), rss)

    def __enter__(self) -> "PhaseMemory":
        from qsurgeon.server.engine import report

        tracker, original_enter, original_exit = self, report.PhaseTimer.__enter__, report.PhaseTimer.__exit__
        self._originals = (original_enter, original_exit)

        def enter(timer) -> None:
            timer._outer = tracker.phase
            tracker.enter(timer.phase)
            _cuda_reset()
            original_enter(timer)

        def exit_(timer, *exc) -> None:
            original_exit(timer, *exc)
            peak = _cuda_peak()
            if peak is not None:
                tracker.device_peak[timer.phase] = max(tracker.device_peak.get(timer.phase, 0), peak)
            tracker.enter(getattr(timer, "_outer", "other"))

        report.PhaseTimer.__enter__, report.PhaseTimer.__exit__ = enter, exit_
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        from qsurgeon.server.engine import report

        self._stop.set()
        self._thread.join()
        report.PhaseTimer.__enter__, report.PhaseTimer.__exit__ = self._originals


def _cuda_reset() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak() -> int | None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def prune_options(args: argparse.Namespace, model: Path, calibration: Path, out: Path) -> dict:
    values = dict(model=str(model), out=str(out), calibration=str(calibration), method=args.method,
                  density=args.density, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                  device=args.device, refit=args.refit, epochs=args.epochs, block_size=args.block_size)
    if args.method == "icbs" and args.steps is not None:
        values["steps_per_epoch"] = args.steps
    return values


def run_one(args: argparse.Namespace) -> dict:
    """Build, prune and measure one model (in this process); returns the measured row."""
    import torch

    from qsurgeon.client.options import PruneOptions
    from qsurgeon.server.engine.run import run_prune

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_model_folder(root / "model", args.hidden, args.depth, args.vocab, args.dtype)
        calibration = token_file(root / "ids.npy", args.samples, args.seq_len, args.vocab)
        options = PruneOptions(**prune_options(args, model, calibration, root / "out"))
        import gc

        gc.collect()
        with PhaseMemory() as memory:
            started = time.perf_counter()
            result = run_prune(options)
            wall = time.perf_counter() - started
        masks = result.masks
        params = sum(p.numel() for p in result.adapter.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in result.adapter.model.parameters())
        mask_bytes = sum(mask.numel() for mask in masks.values())
        densities = [1.0 - float(mask.float().mean()) for mask in masks.values()]
        saved_ok = _reloads(root / "out", masks)
    return {
        "hidden": args.hidden, "depth": args.depth, "params": params, "device": args.device,
        "method": args.method, "seconds": result.report["seconds"], "wall": wall,
        "host_peak": memory.peak, "device_peak": memory.device_peak, "weight_bytes": weight_bytes,
        "mask_bytes": mask_bytes, "density_min": min(densities), "density_max": max(densities),
        "reloads": saved_ok, "placement": result.report.get("placement", {}),
        "torch": torch.__version__,
    }


def _reloads(folder: Path, masks: dict) -> bool:
    """The saved folder loads with from_pretrained and its pruned weights are zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    parameters = dict(model.named_parameters())
    return all(not bool(parameters[name].detach()[mask].any()) for name, mask in masks.items())


def plan_row(args: argparse.Namespace, probe) -> dict:
    from qsurgeon.client.options import PruneOptions
    from qsurgeon.server.engine.plan import estimate, model_shape

    config = llama_config(args.hidden, args.depth, args.vocab, args.dtype).to_dict()
    config["model_type"] = "llama"
    options = PruneOptions(**prune_options(args, Path("m"), Path("c.npy"), Path("o")))
    plan = estimate(model_shape(config), options, probe=probe)
    return {phase.phase: {"seconds": phase.seconds, "host": phase.host_bytes, "device": phase.device_bytes}
            for phase in plan.phases}


def _fmt_mib(value: float) -> str:
    return f"{value / (1 << 20):.0f}"


def table(rows: list[dict]) -> str:
    lines = ["| hidden | depth | params M | phase | seconds | plan s | ratio | host peak MiB | plan MiB | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for phase in PHASES:
            seconds = row["seconds"].get(phase, 0.0)
            planned = row["plan"][phase]
            host = row["host_peak"].get(phase)
            if host is None:
                continue
            ratio_t = planned["seconds"] / seconds if seconds > 0.05 else float("nan")
            lines.append(f"| {row['hidden']} | {row['depth']} | {row['params'] / 1e6:.1f} | {phase} | {seconds:.2f} | "
                         f"{planned['seconds']:.2f} | {ratio_t:.2f} | {_fmt_mib(host)} | {_fmt_mib(planned['host'])} | "
                         f"{planned['host'] / host:.2f} |")
    return "\n".join(lines)


def working_set_table(rows: list[dict]) -> str:
    """Peak host memory minus the model's own bytes (weights + masks) and the process's base."""
    lines = ["| hidden | depth | weights MiB | peak MiB | peak − weights − masks MiB | device peak MiB |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        peak = max(row["host_peak"].values())
        working = peak - row["weight_bytes"] - row["mask_bytes"]
        device = max(row["device_peak"].values()) if row["device_peak"] else 0
        lines.append(f"| {row['hidden']} | {row['depth']} | {_fmt_mib(row['weight_bytes'])} | {_fmt_mib(peak)} | "
                     f"{_fmt_mib(working)} | {_fmt_mib(device) if device else '-'} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="icbs")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=500, help="iCBS blocks per epoch and transformer block")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-plan", action="store_true", help="skip the plan comparison")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.one:
        print("ROW " + json.dumps(run_one(args)))
        return 0
    rows = []
    probe = None
    if not args.no_plan:
        from qsurgeon.server.engine.plan import measure_probe

        probe = measure_probe(args.block_size)
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for depth in args.depths:
        for hidden in args.widths:
            command = [sys.executable, __file__, *forwarded, "--one", "--hidden", str(hidden), "--depth", str(depth)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
            lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or not lines:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            row = json.loads(lines[-1][4:])
            args.hidden, args.depth = hidden, depth
            row["plan"] = plan_row(args, probe) if probe is not None else {p: {"seconds": 0, "host": 0, "device": 0}
                                                                           for p in PHASES}
            rows.append(row)
            print(f"hidden {hidden} depth {depth}: {row['wall']:.1f} s, peak host "
                  f"{max(row['host_peak'].values()) / (1 << 20):.0f} MiB, densities "
                  f"{row['density_min']:.4f}..{row['density_max']:.4f}, reloads {row['reloads']}", file=sys.stderr)
    print(table(rows))
    print()
    print(working_set_table(rows))
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({"rows": rows, "probe": None if probe is None else vars(probe)},
                                               indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
