"""The ``sa`` annealing loop as one fused Triton kernel per chunk of sweeps (dense blocks, CUDA).

Why: the torch path (:mod:`sa_cuda`) advances every chain one proposal per step as a few
dozen small kernels; even replayed from CUDA graphs that reached 0.03 G proposals/s on an
H200, because a step is bound by launches, not by work. Here one Triton program runs one
(problem, restart) chain through a whole chunk of sweeps (the whole schedule when there is
no time limit), so a launch costs once per chunk, not once per proposal.

A program keeps its chain in registers, as vectors of BLOCK_B (next power of two ≥ B)
lanes: the fields h = Qx in float64, x, the best state seen and the [ones | zeros] slot
layout of :mod:`sa_cpu`. Picking a swap reads the group tables (read-only, small, cached);
``slot[a]``, ``slot[b]``, ``h[i]`` and ``h[j]`` come out of the vectors as masked sums (a
sum of one non-zero lane is exact); Q[i, j] and the two diagonal entries are scalar loads;
an accepted swap adds row i and subtracts row j of Q (two B-float loads, L2-resident because
a problem's restarts share its Q). Nothing the kernel writes is read back by another thread
before the launch ends, so no barrier is needed.

The arithmetic follows the CPU kernel: the same counter-based random numbers
(:mod:`sa_rng`, the same counters), the same ΔE expression and field update in float64, the
same lazy best-state bookkeeping. Start states, fields, energies and energy scales come from
:class:`sa_cuda._Chains` (bit-identical to the CPU kernel's). The one difference is the
Metropolis exponential, taken in float32 (a decision can differ only when the uniform falls
within ~1e-7 of e^-βΔE), so chains match the CPU's almost always but not by contract; the
answers are re-scored in float64 by ``sa`` either way.

On a machine without a GPU the same kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``
before triton is imported) on the CPU device; that is how the tests check it.
"""

from __future__ import annotations

from qsurgeon.worker.solvers.sa_rng import GAMMA, MAX_BETA_DELTA, MIX1, MIX2

try:  # an optional dependency: without it the torch path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

#: Largest B the fused kernel takes; a chain's vectors live in registers, 8 warps × 16 lanes
#: per thread at 4096. Bigger blocks (and factored ones) keep the torch path.
MAX_FUSED_VARIABLES = 4096


def available() -> bool:
    """Whether the fused kernel can run at all here (triton importable)."""
    return triton is not None


def supports(num_variables: int, factored: bool) -> bool:
    """Whether a bucket of this shape runs fused: dense blocks up to MAX_FUSED_VARIABLES."""
    return available() and not factored and 2 <= num_variables <= MAX_FUSED_VARIABLES


def _block_size(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _warps(block: int) -> int:
    """One warp up to 256 lanes (masked sums stay inside a warp: shuffles, no shared memory)."""
    return max(1, min(8, block // 256))


if triton is not None:
    # jit functions read module globals only as constexprs
    _GAMMA = tl.constexpr(GAMMA)
    _MIX1 = tl.constexpr(MIX1)
    _MIX2 = tl.constexpr(MIX2)
    _MAX_BETA_DELTA = tl.constexpr(MAX_BETA_DELTA)
    _INV_2_53 = tl.constexpr(1.0 / 9007199254740992.0)

    @triton.jit
    def _draw(key, counter):
        """splitmix64(key + counter·γ), as sa_rng.draw (uint64 arithmetic wraps)."""
        z = key + counter.to(tl.uint64) * _GAMMA
        z = (z ^ (z >> 30)) * _MIX1
        z = (z ^ (z >> 27)) * _MIX2
        return z ^ (z >> 31)

    # chunk bounds change with every time-limited chunk: not specialised, so one compile per B
    @triton.jit(do_not_specialize=["sweep_begin", "sweep_end"])
    def _anneal_dense(Q, n, restarts, sw_groups, sw_stride, nsw_of, g_start, g_size, g_count, g_stride,
                      key_run, beta_row, betas, beta_stride, scale, x_ptr, best_x_ptr, slot_ptr, h_ptr,
                      energy_ptr, best_energy_ptr, accepted_ptr, sweep_begin, sweep_end,
                      BLOCK_B: tl.constexpr):
        c = tl.program_id(0).to(tl.int64)
        p = c // restarts
        lanes = tl.arange(0, BLOCK_B)
        inside = lanes < n
        base = c * n
        x = tl.load(x_ptr + base + lanes, mask=inside, other=0).to(tl.int32)
        best_x = tl.load(best_x_ptr + base + lanes, mask=inside, other=0).to(tl.int32)
        slot = tl.load(slot_ptr + base + lanes, mask=inside, other=0).to(tl.int32)
        h = tl.load(h_ptr + base + lanes, mask=inside, other=0.0)
        current = tl.load(energy_ptr + c)
        best = tl.load(best_energy_ptr + c)
        moves = tl.load(accepted_ptr + c)
        key = tl.load(key_run + c).to(tl.uint64, bitcast=True)
        nsw = tl.load(nsw_of + p)
        row = tl.load(beta_row + c)
        chain_scale = tl.load(scale + c)
        qo = p * n * n
        tables = p * g_stride
        at_best = tl.zeros((), tl.int32)  # best_x already holds the best state until a move beats it
        if nsw > 0:  # else no swap is possible: nothing to anneal
            # while loops, not range(): Triton's interpreter (the tests) cannot take a runtime bound as
            # a range() argument with NumPy ≥ 2.4; compiled, both are the same scf loop
            sweep = sweep_begin + tl.zeros((), tl.int64)
            while sweep < sweep_end:
                beta = tl.load(betas + row * beta_stride + sweep) / chain_scale
                step = tl.zeros((), tl.int64)
                while step < n:
                    t3 = 3 * (sweep * n + step)
                    r = _draw(key, t3)
                    choice = tl.zeros((), tl.int64)
                    if nsw > 1:
                        choice = (((_draw(key, t3 + 2) >> 32) * nsw.to(tl.uint64)) >> 32).to(tl.int64)
                    group = tl.load(sw_groups + p * sw_stride + choice)
                    first = tl.load(g_start + tables + group)
                    size = tl.load(g_size + tables + group)
                    ones = tl.load(g_count + tables + group)
                    # a number in 0..m-1 from 32 random bits by multiply-shift, as sa_cpu._below
                    a = (first + (((r >> 32) * ones.to(tl.uint64)) >> 32).to(tl.int64)).to(tl.int32)
                    b = (first + ones + (((r & 0xFFFFFFFF) * (size - ones).to(tl.uint64)) >> 32).to(tl.int64)).to(tl.int32)
                    # slot[a] (a one) and slot[b] (a zero) in one masked sum: B ≤ 4096 < 2^15
                    pair = tl.sum(tl.where(lanes == a, slot, tl.where(lanes == b, slot << 16, 0)))
                    j = pair & 0xFFFF
                    i = pair >> 16
                    h_i = tl.sum(tl.where(lanes == i, h, 0.0))
                    h_j = tl.sum(tl.where(lanes == j, h, 0.0))
                    row_i = qo + i.to(tl.int64) * n
                    row_j = qo + j.to(tl.int64) * n
                    d_i = tl.load(Q + row_i + i).to(tl.float64)
                    d_j = tl.load(Q + row_j + j).to(tl.float64)
                    q_ij = tl.load(Q + row_i + j).to(tl.float64)
                    delta = 2.0 * h_i + d_i - 2.0 * h_j + d_j - 2.0 * q_ij
                    accept = delta <= 0.0
                    if delta > 0.0:
                        exponent = beta * delta
                        uniform = ((_draw(key, t3 + 1) >> 11).to(tl.float64) + 0.5) * _INV_2_53
                        chance = tl.exp(-tl.minimum(exponent, _MAX_BETA_DELTA).to(tl.float32)).to(tl.float64)
                        accept = (exponent <= _MAX_BETA_DELTA) & (uniform < chance)
                    if accept:
                        if (at_best != 0) & (delta > 0.0):  # climbing out of the best state seen: keep a copy
                            best_x = x
                            at_best = tl.zeros((), tl.int32)
                        slot = tl.where(lanes == a, i, tl.where(lanes == b, j, slot))
                        x = tl.where(lanes == i, 1, tl.where(lanes == j, 0, x))
                        q_row_i = tl.load(Q + row_i + lanes, mask=inside, other=0.0).to(tl.float64)
                        q_row_j = tl.load(Q + row_j + lanes, mask=inside, other=0.0).to(tl.float64)
                        h += q_row_i - q_row_j
                        current += delta
                        moves += 1
                        if current < best:  # invariant: at_best implies current == best
                            best = current
                            at_best = tl.full((), 1, tl.int32)
                    step += 1
                sweep += 1
        if at_best != 0:
            best_x = x
        tl.store(x_ptr + base + lanes, x.to(tl.uint8), mask=inside)
        tl.store(best_x_ptr + base + lanes, best_x.to(tl.uint8), mask=inside)
        tl.store(slot_ptr + base + lanes, slot.to(tl.int64), mask=inside)
        tl.store(h_ptr + base + lanes, h, mask=inside)
        tl.store(energy_ptr + c, current)
        tl.store(best_energy_ptr + c, best)
        tl.store(accepted_ptr + c, moves)


def anneal(chains, sweep_begin: int, sweep_end: int) -> None:
    """Advance every chain of a dense :class:`sa_cuda._Chains` through sweeps [begin, end) in one launch.

    Reads and writes the chains' own tensors (x, best_x, slot, h, energy, best_energy,
    accepted), so chunks can follow each other (and the torch path's ``anneal``) freely.
    """
    bucket = chains.bucket
    if bucket.Q is None:
        raise ValueError("the fused kernel anneals dense buckets only")
    if sweep_end <= sweep_begin:
        return
    n = chains.n
    block = _block_size(n)
    for name in ("x", "best_x", "slot", "h", "energy", "best_energy", "accepted", "scale"):
        tensor = getattr(chains, name)
        if not tensor.is_contiguous():
            setattr(chains, name, tensor.contiguous())
    Q = bucket.Q if bucket.Q.is_contiguous() else bucket.Q.contiguous()
    betas = chains.betas.contiguous()
    _anneal_dense[(chains.pc.shape[0],)](
        Q, n, chains.restarts, bucket.sw_groups, bucket.sw_groups.shape[1], bucket.nsw, bucket.g_start,
        bucket.g_size, bucket.g_count, bucket.g_start.shape[1], chains.key_run, chains.beta_row, betas,
        betas.shape[1], chains.scale, chains.x, chains.best_x, chains.slot, chains.h, chains.energy,
        chains.best_energy, chains.accepted, sweep_begin, sweep_end, BLOCK_B=block, num_warps=_warps(block))

