"""The ``sa`` kernel as one torch tensor program over every chain (for CUDA).

Problems are bucketed by (dense or factored, B, r); in a bucket every (problem, restart)
chain advances one swap proposal per step as one set of tensor operations, so thousands
of chains share each launch. Group structures may differ inside a bucket (padded tables).

The arithmetic mirrors :mod:`sa_cpu` step for step: the same counter-based random numbers
(:mod:`sa_rng`), the same [ones | zeros] slot layout, the same ΔE expression and the same
lazy best-state bookkeeping. Initial fields are accumulated variable by variable in index
order, as the CPU kernel does, so for dense problems both paths follow the very same
chains (the tests run this module on the CPU device and compare). For factored problems
the O(r) dot product is summed as a fixed pairwise tree (the order cannot depend on how
many chains share the launch), so they agree with the CPU only to rounding.

One step is a few dozen small kernels whatever the number of chains. On CUDA the step
loop is captured once per bucket as a CUDA graph of up to 64 steps (every input of a step,
the proposal counter and the sweep's β included, lives on the device), so a sweep costs
B/64 graph launches instead of B × a few dozen kernel launches; elsewhere (the CPU device
of the tests) the same step runs eagerly.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.block.stack import flat_matrices
from qsurgeon.worker.solvers.base import time_share
from qsurgeon.worker.solvers.sa_cpu import ChainResults, next_chunk, override_scales
from qsurgeon.worker.solvers.sa_rng import GAMMA, MAX_BETA_DELTA, MIX1, MIX2, SCALE_SAMPLES


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1 = _signed(MIX1)
_MIX2 = _signed(MIX2)
_MASK32 = (1 << 32) - 1
_SCALE_PIECE = 16  # swaps per chain evaluated at once when estimating the energy scale


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def draw(key: torch.Tensor, counter: int | torch.Tensor) -> torch.Tensor:
    """splitmix64(key + counter·γ) with int64 wrap-around, equal bit for bit to the CPU kernel's."""
    if isinstance(counter, int):
        return mix64(key + _signed(counter * GAMMA))
    return mix64(key + counter * _signed(GAMMA))


def _below(bits32: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (bits32 * n) >> 32


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * (1.0 / 9007199254740992.0)


def _tree_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in a fixed pairwise order, whatever the leading shape."""
    width = values.shape[-1]
    padded = 1 << max(width - 1, 0).bit_length()
    if padded != width:
        values = torch.nn.functional.pad(values, (0, padded - width))
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        values = values[..., :half] + values[..., half:]
    return values[..., 0]


@dataclass
class _Bucket:
    """Device tensors of the problems of one bucket and of their chains."""

    problems: list[int]
    group: torch.Tensor  # (P, B) int64 labels
    g_start: torch.Tensor  # (P, G) int64
    g_size: torch.Tensor
    g_count: torch.Tensor
    sw_groups: torch.Tensor  # (P, S) int64, padded with 0
    nsw: torch.Tensor  # (P,) int64
    x0: torch.Tensor  # (P, B) uint8
    Q: torch.Tensor | None  # (P, B, B) float32
    diag: torch.Tensor | None  # (P, B) float64
    FT: torch.Tensor | None  # (P, B, r) float32
    c: torch.Tensor | None  # (P, B) float64


def _pad_stack(arrays: list[np.ndarray], fill: int = 0) -> np.ndarray:
    width = max(max(array.shape[0] for array in arrays), 1)
    out = np.full((len(arrays), width), fill, np.int64)
    for row, array in enumerate(arrays):
        out[row, : array.shape[0]] = array
    return out


def _device_matrices(chosen: list[BlockProblem], device: torch.device) -> torch.Tensor:
    """The bucket's Q as one (P, B, B) float32 tensor on ``device``, in one host-to-device transfer.

    Why: a round of 8192 B = 128 blocks is 512 MB of matrices; stacking them on the host
    (np.stack, then astype) copied them twice before the transfer. :func:`flat_matrices`
    reads a MatrixStack's views in place (block/stack.py), so the round goes to the device
    straight from the builder's buffer. Never written to.
    """
    size = chosen[0].num_variables
    flat = flat_matrices(chosen).reshape(len(chosen), size, size)
    with warnings.catch_warnings():  # a read-only stack view: torch only reads it for the copy
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        host = torch.from_numpy(flat)
    return host.to(device)


def _bucket(problems: list[BlockProblem], indices: list[int], device: torch.device) -> _Bucket:
    chosen = [problems[i] for i in indices]
    sizes = [np.bincount(p.group_of, minlength=p.num_groups).astype(np.int64) for p in chosen]
    starts = [np.concatenate(([0], np.cumsum(s)[:-1])).astype(np.int64) for s in sizes]
    swappable = [np.nonzero((p.counts > 0) & (p.counts < s))[0] for p, s in zip(chosen, sizes)]

    def tensor(array, dtype=None):
        return torch.as_tensor(np.ascontiguousarray(array), device=device, dtype=dtype)

    factored = chosen[0].is_factored
    Q = None if factored else _device_matrices(chosen, device)
    return _Bucket(
        problems=indices,
        group=tensor(np.stack([p.group_of for p in chosen]).astype(np.int64)),
        g_start=tensor(_pad_stack(starts)),
        g_size=tensor(_pad_stack(sizes)),
        g_count=tensor(_pad_stack([p.counts.astype(np.int64) for p in chosen])),
        sw_groups=tensor(_pad_stack(swappable)),
        nsw=tensor(np.array([s.shape[0] for s in swappable], np.int64)),
        x0=tensor(np.stack([p.x0 if p.x0 is not None else np.zeros(p.num_variables, np.uint8) for p in chosen])),
        Q=Q,
        diag=None if factored else torch.diagonal(Q, dim1=1, dim2=2).to(torch.float64),
        FT=tensor(np.stack([p.F.T for p in chosen]).astype(np.float32)) if factored else None,
        c=tensor(np.stack([p.c for p in chosen]).astype(np.float64)) if factored else None,
    )


class _Chains:
    """State of every chain of a bucket; methods mirror the CPU kernels."""

    def __init__(self, bucket: _Bucket, keys: np.ndarray, use_x0: np.ndarray, beta_rows: np.ndarray,
                 betas: np.ndarray, device: torch.device) -> None:
        self.bucket = bucket
        problems, restarts = keys.shape[0], keys.shape[1]
        self.restarts = restarts
        self.n = bucket.group.shape[1]
        self.pc = torch.arange(problems * restarts, device=device) // restarts
        as_int64 = lambda column: torch.as_tensor(  # noqa: E731
            np.ascontiguousarray(keys[:, :, column].reshape(-1)).view(np.int64), device=device)
        self.key_start, self.key_scale, self.key_run = as_int64(0), as_int64(1), as_int64(2)
        self.use_x0 = torch.as_tensor(np.repeat(use_x0, restarts), device=device)
        self.all_x0 = bool(np.all(use_x0))
        self.beta_row = torch.as_tensor(np.repeat(beta_rows, restarts).astype(np.int64), device=device)
        self.betas = torch.as_tensor(betas, device=device)
        self.nsw = bucket.nsw[self.pc]
        self.active = self.nsw > 0
        self.device = device
        chains = self.pc.shape[0]
        self.rows = torch.arange(chains, device=device)
        self.t = torch.zeros((), dtype=torch.int64, device=device)
        self.beta = torch.zeros(chains, dtype=torch.float64, device=device)
        self.at_best = torch.zeros(chains, dtype=torch.bool, device=device)
        self.graph = None
        self.graph_failed = False
        self.graph_steps = _graph_steps(self.n)

    # -------------------------------------------------------------- proposals
    def _pick(self, key: torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (a: a one, b: a zero) of one random swappable group per chain."""
        bucket, pc = self.bucket, self.pc
        if isinstance(t, int):
            r = draw(key, 3 * t)
            r_group = draw(key, 3 * t + 2)
        else:
            r = draw(key[:, None], 3 * t)
            r_group = draw(key[:, None], 3 * t + 2)
            pc = pc[:, None]
        nsw = bucket.nsw.take(pc)
        choice = _below(_shift_right(r_group, 32), nsw.clamp(min=1))
        # flat takes rather than advanced indexing [pc, group]: the same entries, cheaper gathers
        group = bucket.sw_groups.view(-1).take(pc * bucket.sw_groups.shape[1] + choice)
        at = pc * bucket.g_start.shape[1] + group
        start, size, ones = bucket.g_start.view(-1).take(at), bucket.g_size.view(-1).take(at), bucket.g_count.view(-1).take(at)
        a = start + _below(_shift_right(r, 32), ones)
        b = start + ones + _below(r & _MASK32, (size - ones).clamp(min=0))
        return a.clamp(max=self.n - 1), b.clamp(max=self.n - 1)

    def _delta(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """ΔE of x_i: 0→1, x_j: 1→0; i and j are (C,) or (C, m)."""
        bucket = self.bucket
        pc = self.pc if i.dim() == 1 else self.pc[:, None]
        if bucket.Q is not None:
            # flat torch.take instead of advanced indexing Q[pc, i, j]: same entries, one cheap gather
            h_i, h_j = self._gather(self.h, i), self._gather(self.h, j)
            n = self.n
            base_i, base_j = pc * n + i, pc * n + j
            diag = bucket.diag.view(-1)
            return (2.0 * h_i + diag.take(base_i) - 2.0 * h_j + diag.take(base_j)
                    - 2.0 * bucket.Q.view(-1).take(base_i * n + j).to(torch.float64))
        d = bucket.FT[pc, i].to(torch.float64) - bucket.FT[pc, j].to(torch.float64)
        u = self.u if i.dim() == 1 else self.u[:, None, :]
        return _tree_sum(d * (2.0 * u + d)) + bucket.c[pc, i] - bucket.c[pc, j]

    @staticmethod
    def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if index.dim() == 1:
            return values.gather(1, index[:, None])[:, 0]
        return values.gather(1, index)

    # -------------------------------------------------------------- start
    def start(self) -> None:
        """Start states, fields, energies and energy scales of every chain.

        Vectorised over chains; only the field sums loop over variables, because they must
        be accumulated in the CPU kernel's order to follow its chains bit for bit. Each such
        step is one fused multiply-add over (problems, restarts, B), broadcast over the
        restarts instead of gathering every chain's copy of the matrix.
        """
        bucket, pc, n = self.bucket, self.pc, self.n
        problems, restarts = bucket.group.shape[0], self.restarts
        chains = pc.shape[0]
        variables = torch.arange(n, device=self.device)
        group = bucket.group.repeat_interleave(restarts, dim=0)
        if self.all_x0:  # iCBS: every chain starts from its problem's mask; no random state needed
            self.x = bucket.x0.repeat_interleave(restarts, dim=0)
        else:
            composite = (group << 32) | _shift_right(draw(self.key_start[:, None], variables), 32)
            order = torch.argsort(composite, dim=1, stable=True)
            sorted_group = group.gather(1, order)
            rank = variables[None, :] - bucket.g_start[pc[:, None], sorted_group]
            random_x = torch.zeros((chains, n), dtype=torch.uint8, device=self.device)
            random_x.scatter_(1, order, (rank < bucket.g_count[pc[:, None], sorted_group]).to(torch.uint8))
            self.x = torch.where(self.use_x0[:, None], bucket.x0[pc], random_x)
        slot_key = group * (2 * n) + (1 - self.x.to(torch.int64)) * n + variables[None, :]
        self.slot = torch.argsort(slot_key, dim=1)
        x64 = self.x.to(torch.float64)
        x3 = x64.view(problems, restarts, n)
        energy = torch.zeros(chains, dtype=torch.float64, device=self.device)
        if bucket.Q is not None:
            # h_v = Σ_u Q_vu x_u in the CPU kernel's order (u ascending). Q is symmetric (BlockProblem
            # guarantees it), so column u is row u: a contiguous read, the same float32 values.
            h3 = torch.zeros((problems, restarts, n), dtype=torch.float64, device=self.device)
            symmetric = bool(torch.equal(bucket.Q, bucket.Q.transpose(1, 2)))
            for column in range(n):
                line = bucket.Q[:, column, :] if symmetric else bucket.Q[:, :, column]
                h3.addcmul_(x3[:, :, column : column + 1], line[:, None, :])  # float32 promoted: exact
            self.h = h3.view(chains, n)
            for v in range(n):
                energy += x64[:, v] * self.h[:, v]
        else:
            rank_r = bucket.FT.shape[2]
            u3 = torch.zeros((problems, restarts, rank_r), dtype=torch.float64, device=self.device)
            diagonal = torch.zeros((problems, restarts), dtype=torch.float64, device=self.device)
            for v in range(n):
                u3.addcmul_(x3[:, :, v : v + 1], bucket.FT[:, None, v].to(torch.float64))
                diagonal += x3[:, :, v] * bucket.c[:, None, v]
            self.u = u3.view(chains, rank_r)
            for k in range(rank_r):
                energy += self.u[:, k] * self.u[:, k]
            energy += diagonal.view(chains)
        self.energy = energy
        self.best_energy = energy.clone()
        self.best_x = self.x.clone()
        self.accepted = torch.zeros(chains, dtype=torch.int64, device=self.device)
        pieces = []
        piece = SCALE_SAMPLES if bucket.Q is not None else _SCALE_PIECE  # dense: (C, 256) at once
        for first in range(0, SCALE_SAMPLES, piece):  # bounded memory: (C, piece, r) for factored
            samples = torch.arange(first, first + piece, device=self.device)
            a, b = self._pick(self.key_scale, samples[None, :].expand(chains, -1))
            pieces.append(self._delta(self.slot.gather(1, b), self.slot.gather(1, a)).abs())
        ordered = torch.cat(pieces, dim=1).sort(dim=1).values
        half = SCALE_SAMPLES // 2
        scale = 0.5 * (ordered[:, half - 1] + ordered[:, half])
        mean = ordered.mean(dim=1)
        scale = torch.where(scale > 0, scale, torch.where(mean > 0, mean, torch.ones_like(mean)))
        self.scale = torch.where(self.active, scale, torch.ones_like(scale))

    # -------------------------------------------------------------- annealing
    def _step(self) -> None:
        """One swap proposal for every chain, entirely in place on device tensors.

        The proposal counter ``self.t`` and the β of the sweep ``self.beta`` live on the device
        too, so a sequence of steps has no host-side input and can be captured once in a CUDA
        graph and replayed (one launch per graph instead of a few dozen per step).
        """
        bucket, pc, rows = self.bucket, self.pc, self.rows
        t = self.t
        a, b = self._pick(self.key_run, t.reshape(1, 1).expand(pc.shape[0], 1))
        a, b = a[:, 0], b[:, 0]
        j = self.slot[rows, a]
        i = self.slot[rows, b]
        delta = self._delta(i, j)
        beta = self.beta
        exponent = (beta * delta).clamp(min=0.0, max=MAX_BETA_DELTA)
        uniform = _uniform(draw(self.key_run, 3 * t + 1))
        accept = self.active & ((delta <= 0.0) | ((beta * delta <= MAX_BETA_DELTA) & (uniform < torch.exp(-exponent))))
        leave = accept & self.at_best & (delta > 0.0)
        self.best_x.copy_(torch.where(leave[:, None], self.x, self.best_x))
        self.at_best &= ~leave
        self.slot[rows, a] = torch.where(accept, i, j)
        self.slot[rows, b] = torch.where(accept, j, i)
        self.x[rows, i] = torch.where(accept, 1, self.x[rows, i]).to(torch.uint8)
        self.x[rows, j] = torch.where(accept, 0, self.x[rows, j]).to(torch.uint8)
        if bucket.Q is not None:
            change = bucket.Q[pc, i].to(torch.float64) - bucket.Q[pc, j].to(torch.float64)
            self.h += torch.where(accept[:, None], change, 0.0)
        else:
            change = bucket.FT[pc, i].to(torch.float64) - bucket.FT[pc, j].to(torch.float64)
            self.u += torch.where(accept[:, None], change, 0.0)
        self.energy += torch.where(accept, delta, 0.0)
        self.accepted += accept
        improved = self.energy < self.best_energy
        self.best_energy.copy_(torch.where(improved, self.energy, self.best_energy))
        self.at_best |= improved
        self.t += 1

    def _state(self) -> list[torch.Tensor]:
        fields = self.h if self.bucket.Q is not None else self.u
        return [self.x, self.slot, fields, self.energy, self.best_energy, self.best_x, self.accepted, self.at_best, self.t]

    def _graph(self) -> "torch.cuda.CUDAGraph | None":
        """A CUDA graph of ``self.graph_steps`` steps (captured once per bucket), or None off CUDA.

        Capturing needs one eager warm-up on a side stream; the state is restored after it,
        so the chains are exactly those of the eager loop. Any failure to capture falls back
        to eager steps (same results, more launches).
        """
        if self.device.type != "cuda" or not USE_CUDA_GRAPHS:
            return None
        if self.graph is not None:
            return self.graph
        saved = [tensor.clone() for tensor in self._state()]
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.graph_steps):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for tensor, copy in zip(self._state(), saved):
                tensor.copy_(copy)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.graph_steps):
                    self._step()
            self.graph = graph
        except RuntimeError:
            for tensor, copy in zip(self._state(), saved):
                tensor.copy_(copy)
            self.graph = None
            self.graph_failed = True
        return self.graph

    def anneal(self, sweep_begin: int, sweep_end: int) -> None:
        n = self.n
        self.at_best.zero_()
        self.t.fill_(sweep_begin * n)
        for sweep in range(sweep_begin, sweep_end):
            self.beta.copy_(self.betas[self.beta_row, sweep] / self.scale)
            graph = self._graph()
            if graph is not None:
                for _ in range(n // self.graph_steps):
                    graph.replay()
            else:
                for _ in range(n):
                    self._step()
        self.best_x.copy_(torch.where(self.at_best[:, None], self.x, self.best_x))


#: Capture the step loop in CUDA graphs (set False to compare with eager launches).
USE_CUDA_GRAPHS = True
#: Most steps per captured graph; the graph length is the largest divisor of B up to this.
MAX_GRAPH_STEPS = 64


def _graph_steps(n: int) -> int:
    return max(d for d in range(1, min(n, MAX_GRAPH_STEPS) + 1) if n % d == 0)


def _run_bucket(bucket: _Bucket, keys: np.ndarray, use_x0: np.ndarray,
                beta_rows: np.ndarray, betas: np.ndarray, deadline: float | None,
                device: torch.device, scales: np.ndarray | None = None, fused: bool = False) -> list[ChainResults]:
    """Start and anneal one bucket; ``fused``: the sweeps run in the Triton kernel of :mod:`sa_triton`
    (same start, same chunking, same state tensors), else in the step loop of :class:`_Chains`."""
    chains = _Chains(bucket, keys, use_x0, beta_rows, betas, device)
    if fused:
        from qsurgeon.worker.solvers import sa_triton

        advance = functools.partial(sa_triton.anneal, chains)
    else:
        advance = chains.anneal
    chains.start()
    if scales is not None:
        scale = chains.scale.cpu().numpy()
        override_scales(scale, scales, chains.restarts)
        chains.scale.copy_(torch.as_tensor(scale, device=device))
    total = betas.shape[1]
    done = 0
    started = time.perf_counter()
    while done < total:
        if deadline is not None and done > 0 and time.perf_counter() >= deadline:
            break
        chunk = next_chunk(total - done, done, time.perf_counter() - started, deadline)
        advance(done, done + chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += chunk
    restarts = chains.restarts
    best_x = chains.best_x.cpu().numpy().reshape(len(bucket.problems), restarts, -1)
    best_energy = chains.best_energy.cpu().numpy().reshape(-1, restarts)
    accepted = chains.accepted.cpu().numpy().reshape(-1, restarts)
    scale = chains.scale.cpu().numpy().reshape(-1, restarts)
    return [ChainResults(best_x=best_x[k].copy(), kernel_energy=best_energy[k].copy(), accepted=accepted[k].copy(),
                         scale=scale[k].copy(), sweeps_done=done) for k in range(len(bucket.problems))]


#: Values of ``sa``'s ``cuda_kernel`` parameter: "fused" (Triton, dense buckets), "graph" (the
#: step loop of this module), "auto" (fused where triton is importable).
KERNELS = ("auto", "fused", "graph")
_fused_failure: str | None = None  # why the fused kernel failed in this process ("auto" then stops trying)


def bucket_kernel(kernel: str, num_variables: int, factored: bool) -> str:
    """"fused" or "graph": what runs a bucket of this shape under ``kernel``.

    Factored buckets, blocks above sa_triton.MAX_FUSED_VARIABLES and, under "auto", a
    machine without triton (or where the fused kernel already failed) keep the graph path.
    """
    if kernel == "graph":
        return "graph"
    from qsurgeon.worker.solvers import sa_triton

    if not sa_triton.supports(num_variables, factored):
        return "graph"
    if kernel == "auto" and _fused_failure is not None:
        return "graph"
    return "fused"


def run_batch(problems: list[BlockProblem], keys: np.ndarray, use_x0: np.ndarray, beta_rows: np.ndarray,
              betas: np.ndarray, time_limit: float | None, device: str | torch.device = "cuda",
              scales: np.ndarray | None = None, kernel: str = "graph") -> list[ChainResults]:
    """Same contract as :func:`sa_cpu.run_batch`, on a torch device (CUDA; the CPU for tests).

    kernel: one of KERNELS (see :func:`bucket_kernel`). Under "auto" a fused bucket that fails
    (Triton cannot compile for this GPU, say) warns once and reruns on the graph path.
    """
    global _fused_failure
    device = torch.device(device)
    buckets: dict[tuple, list[int]] = {}
    for index, problem in enumerate(problems):
        buckets.setdefault((problem.is_factored, problem.num_variables, problem.rank or 0), []).append(index)
    order = list(buckets.values())
    work = [sum(problems[i].num_variables * (problems[i].rank or problems[i].num_variables) for i in part)
            for part in order]
    results: list[ChainResults | None] = [None] * len(problems)
    started = time.perf_counter()
    for position, part in enumerate(order):
        share = time_share(time_limit, started, work, position)
        deadline = None if share is None else time.perf_counter() + share
        first = problems[part[0]]
        fused = bucket_kernel(kernel, first.num_variables, first.is_factored) == "fused"
        bucket = _bucket(problems, part, device)
        arguments = (bucket, keys[part], use_x0[part], beta_rows[part], betas, deadline, device,
                     None if scales is None else np.asarray(scales)[part])
        try:
            answers = _run_bucket(*arguments, fused=fused)
        except Exception as error:  # noqa: BLE001 - any compile or launch failure of an optional kernel
            if not fused or kernel != "auto":
                raise
            _fused_failure = f"{type(error).__name__}: {error}"
            warnings.warn(f"sa: the fused Triton kernel failed ({_fused_failure}); using the CUDA graph path",
                          RuntimeWarning, stacklevel=2)
            answers = _run_bucket(*arguments, fused=False)
        for index, answer in zip(part, answers):
            results[index] = answer
    return results  # type: ignore[return-value]
