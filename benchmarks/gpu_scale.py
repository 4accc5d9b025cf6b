"""GPU scale check (run by benchmarks/gpu_scale.sh; see there for what it needs).

1. End to end: a random-init Llama-3.2-1B-shaped model (hidden 2048, 16 blocks, 32 query /
   8 KV heads, MLP 8192, vocab 128256, tied embeddings; 1.24 B parameters, bf16) saved as
   safetensors, pruned with ``--device cuda`` (iCBS from Wanda's mask, a short epoch, refit),
   every phase timed with its peak host RSS and peak device memory; the saved folder
   reloaded and its densities checked; perplexity of dense and pruned on the GPU.
2. Agreement: the same small model pruned with Wanda on the CPU and on the GPU: the
   fraction of identical mask entries (the Grams differ by float rounding only).

``--tiny`` runs the same steps on a 2-block, hidden-128 model on whatever device there is
(that is how it is tested on CPU-only machines). One table on stdout; JSON to
$OUT/gpu_scale.json (or benchmarks/out/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402  (benchmarks/scale.py: model building and the phase memory sampler)

FULL = dict(hidden=2048, depth=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True, dtype="bfloat16",
            samples=32, seq_len=256, batch_size=8, steps=256, eval_windows=16)
TINY = dict(hidden=128, depth=2, intermediate=448, heads=2, kv_heads=1, vocab=512, tied=True, dtype="float32",
            samples=8, seq_len=32, batch_size=4, steps=32, eval_windows=4)


def build(folder: Path, shape: dict, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["depth"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         tie_word_embeddings=shape["tied"], max_position_embeddings=4096, dtype=shape["dtype"])
    dtype = getattr(torch, shape["dtype"])
    torch.set_default_dtype(dtype)  # initialise directly in the checkpoint's dtype: half the memory, faster
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prune(model: Path, calibration: Path, out: Path, device: str, method: str, shape: dict) -> tuple[dict, object]:
    from qsurgeon.client.options import PruneOptions
    from qsurgeon.server.engine.run import run_prune

    values = dict(model=str(model), out=str(out), calibration=str(calibration), method=method, density=0.5,
                  samples=shape["samples"], seq_len=shape["seq_len"], batch_size=shape["batch_size"], device=device)
    if method == "icbs":
        values.update(init="wanda", epochs=1, steps_per_epoch=shape["steps"], refit=True)
    with scale.PhaseMemory() as memory:
        started = time.perf_counter()
        result = run_prune(PruneOptions(**values))
        wall = time.perf_counter() - started
    return {"wall": wall, "seconds": result.report["seconds"], "host_peak": memory.peak,
            "device_peak": memory.device_peak, "placement": result.report.get("placement", {})}, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU scale check")
    parser.add_argument("--tiny", action="store_true", help="a 2-block hidden-128 model (CPU test)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    import torch

    from qsurgeon.server.engine.placement import resolve_device
    from qsurgeon.server.evaluate.perplexity import strided_perplexity

    shape = TINY if args.tiny else FULL
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), file=sys.stderr)
    record: dict = {"shape": shape, "device": str(device)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        t0 = time.perf_counter()
        model = build(root / "model", shape)
        record["build_seconds"] = time.perf_counter() - t0
        calibration = scale.token_file(root / "ids.npy", shape["samples"], shape["seq_len"], shape["vocab"])
        measured, result = prune(model, calibration, root / "out", str(device), "icbs", shape)
        record["icbs"] = measured
        masks = result.masks
        densities = [1.0 - float(mask.float().mean()) for mask in masks.values()]
        record["density_min"], record["density_max"] = min(densities), max(densities)
        record["parameters"] = sum(p.numel() for p in result.adapter.model.parameters())
        del result
        t0 = time.perf_counter()
        record["reloads"] = scale._reloads(root / "out", masks)
        record["reload_seconds"] = time.perf_counter() - t0
        # perplexity on the GPU, dense and pruned (random ids: only the path and the time are the point)
        from transformers import AutoModelForCausalLM

        ids = torch.randint(0, shape["vocab"], (shape["eval_windows"] * shape["seq_len"],),
                            generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        for name, path in (("dense", model), ("pruned", root / "out")):
            lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto").to(device)
            ppl = strided_perplexity(lm, ids, shape["seq_len"], shape["seq_len"] // 2, device=device)
            record[f"perplexity_{name}"] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens,
                                            "seq_len": ppl.seq_len, "stride": ppl.stride}
            del lm
        record["perplexity_seconds"] = time.perf_counter() - t0
        # CPU vs device agreement of Wanda's masks on a small model (float32)
        small = dict(TINY, hidden=256, depth=2, intermediate=896, heads=4, kv_heads=1, dtype="float32")
        small_model = build(root / "small", small, seed=1)
        small_ids = scale.token_file(root / "small.npy", small["samples"], small["seq_len"], small["vocab"])
        _, on_cpu = prune(small_model, small_ids, root / "small-cpu", "cpu", "wanda", small)
        _, on_dev = prune(small_model, small_ids, root / "small-dev", str(device), "wanda", small)
        same = sum(int((on_cpu.masks[n] == on_dev.masks[n]).sum()) for n in on_cpu.masks)
        total = sum(on_cpu.masks[n].numel() for n in on_cpu.masks)
        record["wanda_mask_agreement"] = same / total
    record["total_seconds"] = time.perf_counter() - started

    icbs = record["icbs"]
    print(f"| model | device | phase | seconds | peak host MiB | peak device MiB |")
    print("|---|---|---|---|---|---|")
    label = f"Llama {record['parameters'] / 1e9:.2f} B ({shape['dtype']})"
    for phase in scale.PHASES:
        host = icbs["host_peak"].get(phase, 0) / (1 << 20)
        dev = icbs["device_peak"].get(phase, 0) / (1 << 20)
        print(f"| {label} | {device} | {phase} | {icbs['seconds'].get(phase, 0.0):.1f} | {host:.0f} | "
              f"{dev:.0f} |" if dev else f"| {label} | {device} | {phase} | {icbs['seconds'].get(phase, 0.0):.1f} | "
              f"{host:.0f} | - |")
    print(f"| {label} | {device} | prune total | {icbs['seconds']['total']:.1f} | | |")
    print(f"\nbuild {record['build_seconds']:.1f} s, reload {record['reload_seconds']:.1f} s (zeros kept: "
          f"{record['reloads']}), densities {record['density_min']:.4f}..{record['density_max']:.4f}, perplexity "
          f"{record['perplexity_seconds']:.1f} s (dense {record['perplexity_dense']['perplexity']:.1f}, pruned "
          f"{record['perplexity_pruned']['perplexity']:.1f}), Wanda masks CPU vs {device}: "
          f"{record['wanda_mask_agreement']:.6f} identical; whole check {record['total_seconds']:.1f} s")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_scale.json").write_text(json.dumps(record, indent=2, default=str))
    ok = record["reloads"] and abs(record["density_min"] - 0.5) < 1e-9 and abs(record["density_max"] - 0.5) < 1e-9
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
