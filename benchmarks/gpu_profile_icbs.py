"""Where a prune's iCBS phase spends its time on a device: cProfile of two prunes of a small Llama.

A depth-2 Llama with the 1B class's widths (hidden 2048, MLP 8192, 32/8 heads; random init,
bf16) is pruned twice with iCBS from Wanda: first with 256 steps per transformer block (a cold
process: numba compiles the block solvers' kernels inside the first round), then with 2048
(warm). Prints each run's phase seconds and the profile lines of the iCBS code; writes the full
profiles (by own and by cumulative time) to --out. Without CUDA it runs a hidden-128 model on
the CPU, which is how it is tested.

    python benchmarks/gpu_profile_icbs.py --out benchmarks/out/icbs_profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_scale  # noqa: E402
import scale  # noqa: E402

ICBS_CODE = "icbs|qubo|solvers|rounds|state|objective"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/icbs_profile"))
    parser.add_argument("--steps", type=int, nargs="+", default=[256, 2048],
                        help="iCBS steps per transformer block, one prune each")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(hidden=2048, intermediate=8192, depth=2, heads=32, kv_heads=8, vocab=4096, tied=True,
                 dtype="bfloat16", samples=32, seq_len=256, batch_size=8)
    if device == "cpu":
        shape.update(hidden=128, intermediate=256, heads=4, kv_heads=2, samples=4, seq_len=32)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = gpu_scale.build(root / "model", shape)
        calibration = scale.token_file(root / "ids.npy", shape["samples"], shape["seq_len"], shape["vocab"])
        for steps in args.steps:
            profile = cProfile.Profile()
            profile.enable()
            measured, _ = gpu_scale.prune(model, calibration, root / f"out{steps}", device, "icbs",
                                          dict(shape, steps=steps))
            profile.disable()
            seconds = {phase: round(value, 2) for phase, value in measured["seconds"].items()}
            print(f"{device}, {steps} steps per block: {seconds}")
            for key in ("tottime", "cumulative"):
                stream = io.StringIO()
                pstats.Stats(profile, stream=stream).sort_stats(key).print_stats(40)
                (args.out / f"steps{steps}_{key}.txt").write_text(stream.getvalue())
            stream = io.StringIO()
            pstats.Stats(profile, stream=stream).sort_stats("cumulative").print_stats(ICBS_CODE, 25)
            print(stream.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
