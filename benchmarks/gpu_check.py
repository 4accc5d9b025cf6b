"""GPU check of the ``sa`` annealer (run by benchmarks/gpu_check.sh; see there for what it needs).

1. Throughput: swap proposals per second over a whole round of blocks (B = 128, 2 restarts,
   from x0, as iCBS solves them), on CUDA with the fused Triton kernel (sa_triton) and, for
   comparison, with the torch step loop in CUDA graphs. "kernel only" times the fused launch
   alone on prepared chains (CUDA events; the figure to hold against the 10⁹ proposals/s
   target); the *marginal* rate of the end-to-end rows comes from two runs of different
   length (ΔP/Δt), so it excludes fixed costs (transfer, start states, compilation, key
   hashing); the end-to-end rate includes them.
2. A round's host-side setup alone (0 sweeps), then the round end to end: the same blocks,
   iCBS's default 2 × 32 sweeps, CUDA (fused, then graphs) vs the CPU kernel (numba, all
   cores), and the mean energy of each (same chains: the answers agree on dense blocks up
   to float rounding, and for the fused kernel up to its float32 Metropolis exponential).

If the fused kernel fails (Triton cannot compile it for this GPU, say), the error is printed
and the graph rows still run. Blocks are MiniLM-like synthetic layer-wise blocks (Q = diag(w)·XXᵀ/T·diag(w), correlated
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


def timed_round(problems: list[BlockProblem], device: str, sweeps: int, kernel: str = "auto") -> tuple[float, list]:
    solver = SimulatedAnnealingSolver()
    started = time.perf_counter()
    answers = solver.sample_batch(problems, device=device, sweeps=sweeps, restarts=RESTARTS, start="x0", seed=0,
                                  cuda_kernel=kernel)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - started, answers


def fused_kernel_seconds(problems: list[BlockProblem], sweeps: int) -> float:
    """Seconds of the fused launch alone (CUDA events) for ``sweeps`` sweeps of every chain of a round.

    Start states, fields and scales are prepared first, as sa does, and not timed.
    """
    import torch

    from qsurgeon.worker.solvers import sa, sa_cuda, sa_triton
    from qsurgeon.worker.solvers.sa_rng import chain_keys

    options = sa.AnnealParams.parse({"sweeps": sweeps, "restarts": RESTARTS, "seed": 0, "device": "cuda"})
    keys = np.stack([chain_keys(sa._digest(p), options.seed, RESTARTS) for p in problems])
    betas, _ = sa._beta_table(options)
    use_x0 = np.ones(len(problems), np.bool_)
    device = torch.device("cuda")
    chains = sa_cuda._Chains(sa_cuda._bucket(problems, list(range(len(problems))), device), keys, use_x0,
                             np.full(len(problems), sa.BETA_ROW["x0"]), betas, device)
    chains.start()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    sa_triton.anneal(chains, 0, sweeps)
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def main() -> int:
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else None
    except ImportError:
        cuda, gpu = False, None

    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        rate = row.get("proposals_per_s")
        marginal = row.get("marginal_proposals_per_s")
        print(f"{row['what']:<44}{row['blocks']:>7}{row['chains']:>8}{row['sweeps']:>7}"
              f"{row['seconds']:>9.3f}{(rate or 0) / 1e9:>10.3f}"
              f"{(marginal / 1e9) if marginal else float('nan'):>10.3f}  {row.get('note', '')}", flush=True)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    versions = {"torch": getattr(sys.modules.get("torch"), "__version__", None), "triton": triton_version,
                "cuda": getattr(getattr(sys.modules.get("torch"), "version", None), "cuda", None)}
    print(f"device: {gpu or 'no CUDA device'}; python {platform.python_version()}; {os.cpu_count()} cpus; "
          f"torch {versions['torch']} (CUDA {versions['cuda']}); triton {versions['triton'] or 'not installed'}")
    print(f"{'measurement':<44}{'blocks':>7}{'chains':>8}{'sweeps':>7}{'seconds':>9}{'Gprop/s':>10}{'marg.':>10}")
    timed_round(round_of_blocks(8), "cpu", 1)  # compile / load the CPU kernels outside the timings
    fused_ok = False
    if cuda:
        round_blocks = 8192
        problems = round_of_blocks(round_blocks)
        count = lambda blocks, sweeps: blocks * RESTARTS * sweeps * B  # noqa: E731 - proposals of a run
        try:  # the fused kernel: compile (once per B), the launch alone, then end to end
            started = time.perf_counter()
            timed_round(problems[:8], "cuda", 1, "fused")
            report({"what": "fused: compile + first call (8 blocks)", "blocks": 8, "chains": 8 * RESTARTS,
                    "sweeps": 1, "seconds": time.perf_counter() - started})
            for blocks, sweeps in ((1024, 256), (8192, 128), (8192, 512)):
                seconds = fused_kernel_seconds(problems[:blocks], sweeps)
                report({"what": "fused kernel only (launch, CUDA events)", "blocks": blocks,
                        "chains": blocks * RESTARTS, "sweeps": sweeps, "seconds": seconds,
                        "proposals_per_s": count(blocks, sweeps) / seconds})
            short, long_ = 32, 512
            t_short, _ = timed_round(problems, "cuda", short, "fused")
            t_long, _ = timed_round(problems, "cuda", long_, "fused")
            report({"what": "fused throughput, end to end", "blocks": round_blocks, "chains": round_blocks * RESTARTS,
                    "sweeps": long_, "seconds": t_long, "proposals_per_s": count(round_blocks, long_) / t_long,
                    "marginal_proposals_per_s": (count(round_blocks, long_) - count(round_blocks, short))
                    / max(t_long - t_short, 1e-9)})
            fused_ok = True
        except Exception as error:  # noqa: BLE001 - report any compile/launch failure, keep the graph rows
            import traceback

            traceback.print_exc()
            print(f"FUSED KERNEL FAILED: {type(error).__name__}: {error}", flush=True)
            rows.append({"what": "fused kernel failed", "error": f"{type(error).__name__}: {error}"})
        timed_round(problems[:8], "cuda", 1, "graph")  # warm-up: CUDA context, allocator
        short, long_ = 4, 16
        t_short, _ = timed_round(problems, "cuda", short, "graph")
        t_long, _ = timed_round(problems, "cuda", long_, "graph")
        report({"what": "cuda graphs throughput", "blocks": round_blocks, "chains": round_blocks * RESTARTS,
                "sweeps": long_, "seconds": t_long, "proposals_per_s": count(round_blocks, long_) / t_long,
                "marginal_proposals_per_s": (count(round_blocks, long_) - count(round_blocks, short))
                / max(t_long - t_short, 1e-9)})
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
        for kernel in ("fused", "graph") if fused_ok else ("graph",):
            t_gpu, gpu_answers = timed_round(problems, "cuda", 32, kernel)
            gpu_mean = float(np.mean([a.energy for a in gpu_answers]))
            same = float(np.mean([np.array_equal(a.x, b.x) for a, b in zip(cpu_answers, gpu_answers)]))
            used = sorted({a.metadata.get("cuda_kernel") for a in gpu_answers})
            report({"what": f"round end to end, cuda {kernel} (2 x 32 sweeps)", "blocks": round_blocks,
                    "chains": round_blocks * RESTARTS, "sweeps": 32, "seconds": t_gpu,
                    "proposals_per_s": proposals / t_gpu, "mean_energy": gpu_mean, "share_same_answer_as_cpu": same,
                    "kernels_used": used,
                    "note": f"speed-up {t_cpu / t_gpu:.1f}x; same answer as cpu on {same:.1%} of blocks; "
                            f"mean energy {gpu_mean:.6e} vs {cpu_mean:.6e}; ran {'/'.join(map(str, used))}"})
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": gpu, "cpus": os.cpu_count(), "B": B, **versions,
                                                    "restarts": RESTARTS, "rows": rows}, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
