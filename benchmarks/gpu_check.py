"""GPU check of the ``sa`` annealer (run by benchmarks/gpu_check.sh; see there for what it needs).

1. Throughput: swap proposals per second over a whole round of blocks (B = 128, 2 restarts,
   from x0, as iCBS solves them), on CUDA with the step loop in CUDA graphs and, for
   comparison, with eager launches. The *marginal* rate comes from two runs of different
   length (ΔP/Δt), so it excludes fixed costs (transfer, graph capture, key hashing); the
   end-to-end rate includes them.
2. A round's host-side setup alone (0 sweeps), then the round end to end: the same blocks, iCBS's default 2 × 32 sweeps, CUDA vs the CPU kernel
   (numba, all cores), and the mean energy of each (same chains: the answers must agree on
   dense blocks up to float rounding of the two paths' reductions).

Blocks are MiniLM-like synthetic layer-wise blocks (Q = diag(w)·XXᵀ/T·diag(w), correlated
inputs, heavy-tailed weights, k = B/2, magnitude x0), built in numpy from fixed seeds: no
model, no download. Prints one table; writes gpu_check.json to $OUT (or benchmarks/out/).
Without CUDA the CUDA rows are skipped (said so) and the CPU rows run on a smaller round.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402
from qsurgeon.worker.block.stack import MatrixStack  # noqa: E402
from qsurgeon.worker.solvers.sa import SimulatedAnnealingSolver  # noqa: E402

B = 128
RESTARTS = 2
POOL = 256  # distinct matrices; every block gets its own diagonal shift on top


def round_of_blocks(count: int, size: int = B) -> list[BlockProblem]:
    """``count`` blocks whose matrices are views of one MatrixStack, as an iCBS round builds them.

    So the solver reads them in place (block/stack.py) and the CUDA path moves the whole
    round to the device in one transfer, the way it does in a real round.
    """
    rng = np.random.default_rng(0)
    tokens = 3 * size
    pool = []
    for _ in range(min(POOL, count)):
        latent = rng.standard_normal((size, 4))
        X = latent @ rng.standard_normal((4, tokens)) + 0.5 * rng.standard_normal((size, tokens))
        w = rng.standard_t(3, size) * 0.05
        Q = w[:, None] * (X @ X.T / tokens) * w[None, :]
        pool.append((((Q + Q.T) / 2).astype(np.float32), np.argsort(np.abs(w))[: size // 2]))
    stack = MatrixStack(count * size * size).take(count, size)
    problems = []
    diagonal = np.diag_indices(size)
    for index in range(count):
        Q, pruned = pool[index % len(pool)]
        stack[index] = Q
        stack[index][diagonal] *= np.float32(1.0 + 1e-3 * (index // len(pool)))  # distinct content and chains
        x0 = np.zeros(size, np.uint8)
        x0[pruned] = 1
        problems.append(BlockProblem.dense(stack[index], k=size // 2, x0=x0, id=f"round-{index}", validate=False))
    return problems


def timed_round(problems: list[BlockProblem], device: str, sweeps: int) -> tuple[float, list]:
    solver = SimulatedAnnealingSolver()
    started = time.perf_counter()
    answers = solver.sample_batch(problems, device=device, sweeps=sweeps, restarts=RESTARTS, start="x0", seed=0)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - started, answers


def main() -> int:
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else None
    except ImportError:
        cuda, gpu = False, None
    from qsurgeon.worker.solvers import sa_cuda

    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        rate = row.get("proposals_per_s")
        marginal = row.get("marginal_proposals_per_s")
        print(f"{row['what']:<44}{row['blocks']:>7}{row['chains']:>8}{row['sweeps']:>7}"
              f"{row['seconds']:>9.3f}{(rate or 0) / 1e9:>10.3f}"
              f"{(marginal / 1e9) if marginal else float('nan'):>10.3f}  {row.get('note', '')}", flush=True)

    print(f"device: {gpu or 'no CUDA device'}; python {platform.python_version()}; {os.cpu_count()} cpus")
    print(f"{'measurement':<44}{'blocks':>7}{'chains':>8}{'sweeps':>7}{'seconds':>9}{'Gprop/s':>10}{'marg.':>10}")
    timed_round(round_of_blocks(8), "cpu", 1)  # compile / load the CPU kernels outside the timings
    if cuda:
        for blocks in (1024, 8192):  # 32768 dropped: its marginal rate was fixed-cost noise; keeps this < 4 min
            problems = round_of_blocks(blocks)
            for graphs in (True, False):
                if not graphs and blocks > 1024:
                    continue  # eager launches: the rate no longer depends on the chain count there
                sa_cuda.USE_CUDA_GRAPHS = graphs
                timed_round(problems[:8], "cuda", 1)  # warm-up: CUDA context, allocator
                short, long_ = (4, 16) if graphs else (1, 3)
                t_short, _ = timed_round(problems, "cuda", short)
                t_long, _ = timed_round(problems, "cuda", long_)
                proposals = lambda sweeps: blocks * RESTARTS * sweeps * B  # noqa: E731
                report({"what": f"cuda {'graphs' if graphs else 'eager'} throughput", "blocks": blocks,
                        "chains": blocks * RESTARTS, "sweeps": long_, "seconds": t_long,
                        "proposals_per_s": proposals(long_) / t_long,
                        "marginal_proposals_per_s": (proposals(long_) - proposals(short)) / max(t_long - t_short, 1e-9)})
            sa_cuda.USE_CUDA_GRAPHS = True
        round_blocks = 8192
    else:
        print("(CUDA parts skipped: torch sees no CUDA device; the CPU kernel rows still run)")
        round_blocks = 512
    problems = round_of_blocks(round_blocks)
    for device in ("cpu", "cuda") if cuda else ("cpu",):  # host-side setup alone: 0 sweeps
        t_setup, _ = timed_round(problems, device, 0)
        report({"what": f"round setup only, {device} (0 sweeps)", "blocks": round_blocks,
                "chains": round_blocks * RESTARTS, "sweeps": 0, "seconds": t_setup,
                "note": "keys, start states, fields, energy scales; cuda: transfer too"})
    t_cpu, cpu_answers = timed_round(problems, "cpu", 32)
    cpu_mean = float(np.mean([a.energy for a in cpu_answers]))
    proposals = round_blocks * RESTARTS * 32 * B
    report({"what": "round end to end, cpu kernel (2 x 32 sweeps)", "blocks": round_blocks,
            "chains": round_blocks * RESTARTS, "sweeps": 32, "seconds": t_cpu, "proposals_per_s": proposals / t_cpu,
            "mean_energy": cpu_mean})
    if cuda:
        t_gpu, gpu_answers = timed_round(problems, "cuda", 32)
        gpu_mean = float(np.mean([a.energy for a in gpu_answers]))
        same = float(np.mean([np.array_equal(a.x, b.x) for a, b in zip(cpu_answers, gpu_answers)]))
        report({"what": "round end to end, cuda graphs (2 x 32 sweeps)", "blocks": round_blocks,
                "chains": round_blocks * RESTARTS, "sweeps": 32, "seconds": t_gpu, "proposals_per_s": proposals / t_gpu,
                "mean_energy": gpu_mean, "share_same_answer_as_cpu": same,
                "note": f"speed-up {t_cpu / t_gpu:.1f}x; same answer as cpu on {same:.1%} of blocks; "
                        f"mean energy {gpu_mean:.6e} vs {cpu_mean:.6e}"})
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": gpu, "cpus": os.cpu_count(), "B": B,
                                                    "restarts": RESTARTS, "rows": rows}, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
