"""Exported blocks at hardware scale: write a MiniLM-sized export, then time ``qsurgeon solve DIR``.

Why: a full ``qsurgeon prune builtin:minilm --export-blocks`` writes 27,648 blocks of B = 128
(6 layers × 4,608 blocks: every row of q, k, v, o and fc1 once, fc2's rows four times).
``qsurgeon solve DIR`` must stream them (bounded memory, answers written as they come,
resumable) and finish in minutes on 2 cores. This script builds such a directory without
running a prune: real MiniLM FFN-output rows and their real Gram matrices
(``benchmarks/instances.py``; the built-in MiniLM package, nothing downloaded), blocks of
the 64 most doubtful pruned and 64 most doubtful kept weights of a row, shifted by 64 at
each pass (as iCBS's passes visit other weights), with the answer iCBS's ``sa`` (2 × 32
sweeps from x0) gives as the stored answer, written by the real ``ExportingQueue`` in
rounds of 4,096 blocks. Then it runs the CLI as a user would, interrupts one run with
SIGINT to show the resume, and prints a table (and writes JSON).

    python benchmarks/export_scale.py                       # 27,648 blocks, sa defaults
    python benchmarks/export_scale.py --blocks 2048 --param sweeps=32 --param restarts=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from instances import NUM_LAYERS, _gram, minilm_ffn_data  # noqa: E402
from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402
from qsurgeon.worker.queue.base import RoundRequest  # noqa: E402
from qsurgeon.worker.queue.export import ExportingQueue  # noqa: E402
from qsurgeon.worker.queue.inprocess import InProcessQueue  # noqa: E402

BLOCK = 128
ROUND = 4096
ICBS_SA = {"sweeps": 32, "restarts": 2, "start": "x0"}


def minilm_blocks(count: int, seed: int = 0):
    """``count`` layer-wise blocks of MiniLM FFN-output rows, ids ``tensor:row:pass``."""
    data = minilm_ffn_data()
    rng = np.random.default_rng(seed)
    grams = {layer: _gram(layer) for layer in range(NUM_LAYERS)}
    half = BLOCK // 2
    for index in range(count):
        layer = index % NUM_LAYERS
        gram = grams[layer]
        weight = data[f"weight{layer}"].astype(np.float64)
        row = int(rng.integers(weight.shape[0]))
        shift = (index // NUM_LAYERS) % 6 * half // 2
        w = weight[row]
        scores = np.abs(w) * np.sqrt(np.diag(gram))
        order = np.argsort(scores, kind="stable")
        pruned, kept = order[: w.size // 2], order[w.size // 2:]
        block_pruned = pruned[::-1][shift:shift + half]
        block_kept = kept[shift:shift + half]
        block = np.concatenate([block_pruned, block_kept])
        fixed = np.zeros(w.size)  # the pruned weights outside the block, as a vector
        fixed[pruned] = w[pruned]
        fixed[block_pruned] = 0.0
        coupled = gram @ fixed  # one product gives the linear term and the constant
        w_block = w[block]
        Q = w_block[:, None] * gram[np.ix_(block, block)] * w_block[None, :]
        Q[np.diag_indices(BLOCK)] += 2 * w_block * coupled[block]
        Q = ((Q + Q.T) / 2).astype(np.float32)
        x0 = np.concatenate([np.ones(half, np.uint8), np.zeros(half, np.uint8)])
        yield BlockProblem.dense(Q, k=half, x0=x0, offset=float(fixed @ coupled),
                                 id=f"encoder.layer.{layer}.output.dense.weight:{row}:{index // NUM_LAYERS % 6}")


def generate(directory: Path, count: int) -> dict:
    started = time.perf_counter()
    queue = ExportingQueue(InProcessQueue(), directory)
    batch: list[BlockProblem] = []
    rounds = 0
    for problem in minilm_blocks(count):
        batch.append(problem)
        if len(batch) == ROUND:
            queue.run_round(RoundRequest("bench", f"r{rounds}", batch, "sa", {**ICBS_SA, "seed": rounds}))
            rounds, batch = rounds + 1, []
    if batch:
        queue.run_round(RoundRequest("bench", f"r{rounds}", batch, "sa", {**ICBS_SA, "seed": rounds}))
    size = sum(entry.stat().st_size for entry in directory.iterdir())
    return {"blocks": count, "files": len(list(directory.iterdir())), "bytes": size,
            "seconds": time.perf_counter() - started}


def _peak_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def solve(directory: Path, params: list[str], interrupt_after: float | None = None) -> dict:
    """Run ``qsurgeon solve DIR`` as a subprocess; SIGINT after ``interrupt_after`` seconds."""
    command = [sys.executable, "-m", "qsurgeon.client.cli", "solve", str(directory), "--solver", "sa", "--quiet",
               *[item for param in params for item in ("--param", param)]]
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # SIGINT back to its default in the child: a benchmark started in the background (nohup, &)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    peak = 0
    deadline = None if interrupt_after is None else started + interrupt_after
    while process.poll() is None:  # the child's own peak (VmHWM after exec), not the forked parent's
        peak = max(peak, _peak_rss(process.pid))
        if deadline is not None and time.perf_counter() >= deadline:
            process.send_signal(signal.SIGINT)
            deadline = None
        time.sleep(0.5)
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "returncode": process.returncode, "stdout": out.strip().splitlines()[-3:],
            "stderr": err.strip().splitlines()[-2:], "peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=27_648)
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "cache" / "export_scale")
    parser.add_argument("--param", action="append", default=[], help="passed to qsurgeon solve (NAME=VALUE)")
    parser.add_argument("--interrupt-after", type=float, default=20.0,
                        help="SIGINT the first solve after this many seconds (0: no interruption)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the generated directory")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "out" / "export_scale.json")
    args = parser.parse_args()

    if args.dir.exists() and not args.keep:
        shutil.rmtree(args.dir)
    if not (args.dir / "manifest.json").is_file():
        generated = generate(args.dir, args.blocks)
    else:
        generated = {"blocks": args.blocks, "reused": True}
    for stale in args.dir.glob("*.sa.solution.npz"):
        stale.unlink()
    runs = []
    if args.interrupt_after:
        runs.append(("interrupted", solve(args.dir, args.param, args.interrupt_after)))
    runs.append(("resumed" if args.interrupt_after else "full", solve(args.dir, args.param)))
    answered = len(list(args.dir.glob("*.sa.solution.npz")))
    print(f"export: {generated.get('blocks')} blocks, {generated.get('files', '?')} files, "
          f"{generated.get('bytes', 0) / 2**30:.2f} GiB, written in {generated.get('seconds', 0):.0f} s")
    print("| run | wall s | CPU s | exit | last lines |")
    print("|---|---|---|---|---|")
    for name, run in runs:
        print(f"| {name} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | {run['returncode']} | "
              f"{' / '.join(run['stdout'] + run['stderr'])} |")
    total = sum(run["seconds"] for _, run in runs)
    cpu = sum(run["cpu_seconds"] for _, run in runs)
    print(f"answers written: {answered} of {args.blocks}; solve wall seconds in all: {total:.1f} "
          f"({1000 * total / max(1, args.blocks):.1f} ms per block), CPU seconds {cpu:.1f} "
          f"({1000 * cpu / max(1, args.blocks):.1f} ms per block, {cpu / 2:.0f} s on 2 idle cores); peak RSS of a solve: "
          f"{max(run['peak_rss_bytes'] for _, run in runs) / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"generated": generated, "params": args.param, "runs": dict(runs),
                                     "answered": answered, "cores": os.cpu_count(),
                                     "loadavg": os.getloadavg()}, indent=2))
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
