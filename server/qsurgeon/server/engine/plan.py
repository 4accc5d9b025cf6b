"""The capacity plan of a prune: memory and time per phase, before anything runs.

``qsurgeon plan MODEL [prune options]`` reads only ``config.json`` (a folder without
weights is enough, so a user can plan an 8B model before downloading it) and the options,
and estimates for every phase of :func:`~qsurgeon.server.engine.run.run_prune` (load,
calibrate, init, icbs, refit, save) the peak host and device memory and the seconds:

- on **this machine**, from a short measured probe (a float32 and a float64 matrix
  product, a memory copy, a disk write and read, one real iCBS pass over a synthetic
  tensor, one refit), a few seconds in all;
- on a **named GPU class** (``--gpu h100``), from the stated throughput assumptions of
  :data:`GPU_CLASSES`.

The model behind the numbers (one transformer block on the device at a time; the rest of
the model, its masks and the activations in host memory) is the one
:mod:`qsurgeon.server.engine.placement` implements. Its constants (:data:`EFFICIENCY`)
were fitted to the measurements of ``benchmarks/scale.py`` on random-init Llama models;
the fit and its residuals are in docs/scale.md.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from qsurgeon.client.errors import UsageError
from qsurgeon.server.engine.icbs.schedule import ROUND_BYTES

PHASES: tuple[str, ...] = ("load", "calibrate", "init", "icbs", "refit", "report", "save")
#: model types whose MLP is gated (gate, up, down: three matrices); the rest have two
GATED_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "olmo", "olmo2", "cohere", "granite", "starcoder2_gated", "deepseek_v2", "internlm2"})
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}

#: fitted on benchmarks/scale.py (docs/scale.md): the share of the probe's throughput each phase reaches
EFFICIENCY: dict[str, float] = {
    "forward": 0.72,  # the block forward passes (small matrices, attention, norms)
    "gram": 0.96,  # the float32 Gram products of the linears' inputs
    # iCBS blocks in a run (500 steps spread over seven tensors, rounds cut short by their
    # independence rule) cost ~3× the probe's block, which runs one tensor in full rounds
    "icbs": 0.36,
    "load": 1.0,  # bytes of weights over the probe's read rate, plus transformers' fixed cost
    "save": 1.0,
}
#: seconds a load or a save costs whatever the size (config parsing, tokenizer, building the module)
FIXED_SECONDS = {"load": 0.6, "save": 0.05}
#: host memory of the process before any model: Python, torch, transformers (measured when planning)
BASE_HOST_BYTES = 700 << 20


#: One measured run on one H100 (16-core host), benchmarks/measured/h100-2026-11-26/gpu_scale.json:
#: a random-init 1.24 B Llama (hidden 2048, 16 blocks, bf16), 32 × 256 calibration tokens, iCBS
#: from Wanda with 256 steps per block, refit (`bash benchmarks/gpu_scale.sh`). Each factor is
#: the phase's measured seconds over what the datasheet model below planned for that run, so the
#: GPU plans of other shapes scale that run by their flops. They are fitted on that one run (the
#: plan matches it by construction); the H200 run of the same script (older code) is the only
#: check from outside it (docs/scale.md). Calibrate is 10× the datasheet: the forward passes
#: and Grams are small, per-batch products, and the weights are read from the memory-mapped
#: checkpoint here (the load phase only maps them); Wanda's init is host-bound (9.2 ns per
#: weight against the 0.07 s HBM streaming assumed); the refit's CG converged in far fewer
#: iterations than the CPU-fitted count (8192 tokens: a better conditioned Gram).
GPU_PHASE_FACTORS: dict[str, float] = {"calibrate": 10.1, "init": 129.0, "refit": 0.144, "report": 2.9}
#: iCBS on a GPU host, the same H100 run and a warm profile of it (benchmarks/gpu_profile_icbs.py,
#: icbs_profile_warm.txt there): `auto` answers iCBS's dense blocks with swap-tabu's numba kernel on
#: the host (0.47 ms per block of 128 in rounds of 2048), each tensor first costs its float64 copy,
#: score ranks and row errors (29.5 ns per prunable weight), and a fresh machine first compiles the
#: solvers' kernels (21 s; numba caches them on disk for later runs). `--solver sa` on CUDA runs
#: the fused kernel: a round of 8192 blocks at 2 × 32 sweeps took 0.746 s end to end (gpu_check.json).
GPU_ICBS_BLOCK_SECONDS = 0.47e-3
GPU_ICBS_SA_BLOCK_SECONDS = 0.746 / 8192
GPU_ICBS_SECONDS_PER_WEIGHT = 29.5e-9
GPU_KERNEL_COMPILE_SECONDS = 21.0


@dataclass(frozen=True)
class GPUClass:
    """Throughput assumptions for one GPU: datasheet figures, derated, then scaled per phase by
    :data:`GPU_PHASE_FACTORS` (measured on one H100 run)."""

    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core bf16, the block forward passes
    fp32_tflops: float  # the Gram products (TF32 off: plain float32)
    fp64_tflops: float  # Cholesky, refit and SparseGPT updates in float64
    hbm_tbs: float
    host_read_gbs: float = 2.0  # NVMe read of the safetensors shards
    host_write_gbs: float = 1.5
    host_cores: int = 16
    derate: float = 0.35  # the share of peak a block-at-a-time pipeline reaches (small batches)


#: ``--gpu NAME``: datasheet numbers (SXM parts), derated by ``derate``
GPU_CLASSES: dict[str, GPUClass] = {
    "h100": GPUClass("h100", 80, 989, 67, 67, 3.35),
    "h200": GPUClass("h200", 141, 989, 67, 67, 4.8),
    "a100": GPUClass("a100", 80, 312, 19.5, 19.5, 2.0),
    "l40s": GPUClass("l40s", 48, 362, 91.6, 1.4, 0.86),
}


# ====================================================================== the model's shape
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from config.json: the block's linears and the model's size."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    targets: tuple[tuple[str, int, int], ...]  # (name, out, in) of one block's prunable linears
    gram_inputs: tuple[int, ...]  # the widths of the block's distinct linear inputs
    heads: int
    tied: bool
    dtype_bytes: int
    intermediate: int

    @property
    def block_params(self) -> int:
        return sum(out * width for _, out, width in self.targets)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embedding_params


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The block structure of a Hugging Face decoder or encoder config (Llama, Qwen2, Mistral, Gemma2, GPT-2, BERT)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    get = lambda *names, default=None: next((text[n] for n in names if text.get(n) is not None), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if not isinstance(hidden, int) or not isinstance(layers, int) or hidden < 1 or layers < 1:
        raise UsageError("config.json names no hidden_size / num_hidden_layers: not a transformer this plan knows")
    heads = int(get("num_attention_heads", "n_head", default=max(1, hidden // 64)))
    kv_heads = int(get("num_key_value_heads", default=heads) or heads)
    head_dim = int(get("head_dim", default=hidden // heads) or hidden // heads)
    intermediate = int(get("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden)
    model_type = str(text.get("model_type", config.get("model_type", "")))
    gated = model_type in GATED_TYPES
    q, kv = heads * head_dim, kv_heads * head_dim
    targets = [("q_proj", q, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, q)]
    if gated:
        targets += [("gate_proj", intermediate, hidden), ("up_proj", intermediate, hidden),
                    ("down_proj", hidden, intermediate)]
    else:
        targets += [("fc1", intermediate, hidden), ("fc2", hidden, intermediate)]
    dtype = str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or "float32")
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=layers, vocab=int(get("vocab_size", default=32000)),
        targets=tuple(targets), gram_inputs=(hidden, q, hidden, intermediate), heads=heads,
        tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", model_type == "gpt2"))),
        dtype_bytes=DTYPE_BYTES.get(dtype.removeprefix("torch."), 4), intermediate=intermediate,
    )


# ====================================================================== the probe
@dataclass
class Probe:
    """Throughputs of this machine, measured in a few seconds."""

    fp32_flops: float
    fp64_flops: float
    copy_bytes_per_s: float
    write_bytes_per_s: float
    read_bytes_per_s: float
    icbs_block_seconds: float  # one iCBS block of B weights: build, solve, judge, merge
    block_size: int
    refit_flops: float  # CG refit: effective flop/s counting iterations × 2 out in²
    cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                       else (os.cpu_count() or 1))
    seconds: float = 0.0
    base_host_bytes: int = BASE_HOST_BYTES
    #: a load's cost whatever the model's size: importing transformers' model code and building
    #: a module of the type (several CPU seconds; measured, as it dominates small models' loads)
    load_fixed_seconds: float = 0.0
    #: resident memory once the model code is imported, before the probe's own work: what a
    #: prune holds at the end of its load besides the weights (0: not measured, use base_host_bytes)
    load_host_bytes: int = 0
    #: CPU seconds per wall second over the probe: the cores this process really got. On a
    #: shared machine wall time swings with the neighbours while CPU seconds per flop do not,
    #: so the plan's ``cpu_seconds`` (its seconds × this) is what benchmarks/scale.py compares
    cpu_per_wall: float = 0.0


def _best_of(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_probe(block_size: int = 128, options: Any = None, model_type: str = "llama") -> Probe:
    """Measure this machine: matrix products, memory and disk rates, an iCBS pass, a refit, a load's fixed cost.

    Run it in the process that plans, not the one that prunes: the load probe imports the
    model code, which a later load in the same process would then not pay again.
    """
    import numpy as np
    import torch

    started, cpu_started = time.perf_counter(), time.process_time()
    load_fixed = _probe_load(model_type)
    load_host = _rss_bytes() or 0
    n = 768
    a32 = torch.randn(n, n)
    a64 = a32.double()
    fp32 = 2 * n ** 3 / _best_of(lambda: a32 @ a32)
    fp64 = 2 * n ** 3 / _best_of(lambda: a64 @ a64)
    big = torch.empty(32 << 20, dtype=torch.uint8)
    copy = big.numel() / _best_of(lambda: big.clone())
    payload = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.bin"
        start = time.perf_counter()
        with open(path, "wb") as handle:
            handle.write(payload)
            handle.flush()
        write = len(payload) / max(time.perf_counter() - start, 1e-6)
        start = time.perf_counter()
        path.read_bytes()
        read = len(payload) / max(time.perf_counter() - start, 1e-6)
    icbs_seconds, refit_flops = _probe_search(block_size, options)
    probe = Probe(fp32, fp64, copy, write, read, icbs_seconds, block_size, refit_flops, load_fixed_seconds=load_fixed,
                  load_host_bytes=load_host)
    probe.base_host_bytes = _rss_bytes() or BASE_HOST_BYTES
    probe.seconds = time.perf_counter() - started
    probe.cpu_per_wall = (time.process_time() - cpu_started) / max(probe.seconds, 1e-9)
    return probe


def _probe_load(model_type: str) -> float:
    """Seconds to import the model code of ``model_type`` and build a one-block model of it.

    A load pays this whatever the model's size (``AutoConfig`` and ``AutoModelForCausalLM``
    pull in most of transformers): 5–8 CPU seconds here, which the 0.6 s assumed before
    under-counted 10-fold on the small models of benchmarks/scale.py.
    """
    start = time.perf_counter()
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            config = AutoConfig.for_model(model_type or "llama", hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          vocab_size=128, max_position_embeddings=64)
            try:
                AutoModelForCausalLM.from_config(config)
            except ValueError:  # an encoder: AutoModel
                AutoModel.from_config(config)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - a type transformers cannot build: the default fixed cost
        return FIXED_SECONDS["load"]
    return time.perf_counter() - start


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil ships with the engine's dependencies
        return None


def _probe_search(block_size: int, options: Any) -> tuple[float, float]:
    """Seconds per iCBS block (one real pass over a synthetic 64 × 1024 tensor) and the refit's flop/s."""
    import torch

    from qsurgeon.client.options import PruneOptions
    from qsurgeon.server.engine.icbs import TensorTask, run_icbs
    from qsurgeon.server.engine.options import icbs_config
    from qsurgeon.server.pruning.masks import initial_mask, score_weights
    from qsurgeon.server.pruning.refit import refit_rows
    from qsurgeon.server.pruning.sparsity import Sparsity
    from qsurgeon.worker.queue.inprocess import InProcessQueue

    generator = torch.Generator().manual_seed(0)
    rows, width = 64, 1024
    weight = torch.randn(rows, width, generator=generator)
    inputs = torch.randn(width, 2 * width, generator=generator)
    gram = (inputs @ inputs.T).double()
    sparsity = Sparsity.parse(0.5, None, "row")
    scores = score_weights(weight, "wanda", input_norms=gram.diagonal().sqrt().float())
    mask = initial_mask(scores, sparsity)
    values = {} if options is None else {name: getattr(options, name) for name in ("solver", "solver_params")}
    config = icbs_config(PruneOptions(model="probe", block_size=block_size, coverage=1.0, **values), round_blocks=None)
    task = TensorTask("probe.weight", weight, mask, scores, sparsity, gram=gram)
    run_icbs([task], config, InProcessQueue(), job_id="probe-warm")  # compiled kernels, caches
    start = time.perf_counter()
    state = run_icbs([TensorTask("probe.weight", weight, mask, scores, sparsity, gram=gram)], config,
                     InProcessQueue(), job_id="probe")
    elapsed = time.perf_counter() - start
    blocks = max(1, sum(int(c) for counters in state.counters.values() for c in counters.values()))
    start = time.perf_counter()
    refit_rows(weight, gram, mask, 0.01)
    refit_seconds = time.perf_counter() - start
    return elapsed / blocks, 2.0 * rows * width * width * refit_iterations(width) / max(refit_seconds, 1e-6)


#: CG iterations the refit's cost model counts for a tensor of REFIT_REFERENCE_WIDTH inputs, and
#: how they grow with the input width: a wider input's Gram is worse conditioned and CG needs more
#: iterations to the same residual. A flat count (35) fitted on hidden 256–512 planned 0.51× the
#: measured refit at hidden 1024; the exponent and count are fitted on the width sweep 256–1024
#: (benchmarks/scale.py, refit CPU seconds over the CG's float32 products; docs/scale.md).
REFIT_ITERATIONS = 45
REFIT_REFERENCE_WIDTH = 1024
REFIT_WIDTH_EXPONENT = 0.75


#: ADMM iterations the plan counts per tensor for ALPS (``--method alps``, ``--init alps``); each
#: is two float32 out × in² products through the Gram's eigenbasis plus a projection. Fitted on
#: MiniLM at density 0.5 (ALPS's init phase, report.json; docs/scale.md); the iterations stop when
#: the support settles, at most pruning.alps.MAX_ITER.
ALPS_ITERATIONS = 130


#: ``--match-dense``: forward work of the calibrate phase against plain capture. Per block the
#: plain capture runs the block twice (statistics, pass-on); matching runs each group's pruned
#: and dense passes up to the group's input, the last dense pass whole, and the pass-on: on a
#: BERT block 25 + 25 + 12 units of linear work against 12 + 12 (measured: 11.7 s against 4.5 s
#: of calibrate on MiniLM). The cross-Grams double the Gram products.
MATCH_DENSE_FORWARD_FACTOR = 2.6


def refit_iterations(width: int) -> float:
    """CG iterations the plan counts for refitting a tensor with ``width`` inputs."""
    return REFIT_ITERATIONS * (width / REFIT_REFERENCE_WIDTH) ** REFIT_WIDTH_EXPONENT


# ====================================================================== the estimate
@dataclass
class PhaseEstimate:
    phase: str
    host_bytes: int
    device_bytes: int
    seconds: float
    note: str = ""
    cpu_seconds: float | None = None  # on this machine: seconds × the probe's CPU per wall second


@dataclass
class Plan:
    model: str
    shape: ModelShape
    where: str  # "this machine (cpu)" or a GPU class
    device: str
    phases: list[PhaseEstimate]
    assumptions: list[str]

    @property
    def total_seconds(self) -> float:
        return sum(phase.seconds for phase in self.phases)

    @property
    def peak_host_bytes(self) -> int:
        return max(phase.host_bytes for phase in self.phases)

    @property
    def peak_device_bytes(self) -> int:
        return max(phase.device_bytes for phase in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "where": self.where, "device": self.device,
            "parameters": self.shape.params, "block_parameters": self.shape.block_params, "blocks": self.shape.layers,
            "phases": [vars(phase) for phase in self.phases],
            "total_seconds": self.total_seconds, "peak_host_bytes": self.peak_host_bytes,
            "peak_device_bytes": self.peak_device_bytes, "assumptions": self.assumptions,
        }


def _icbs_blocks(shape: ModelShape, options: Any) -> int:
    """iCBS blocks per epoch over the whole model (rows × passes per row, as the schedule plans them)."""
    if options.method != "icbs" or options.epochs == 0:
        return 0
    block = options.block_size
    per_block = 0
    for _, out, width in shape.targets:
        if options.steps_per_epoch is not None:
            continue
        size = min(block, width)
        per_block += out * max(1, int(round(options.coverage * width / size)))
    if options.steps_per_epoch is not None:
        return options.steps_per_epoch * options.epochs * shape.layers
    return per_block * options.epochs * shape.layers


def fisher_block_bytes(samples: int, block_weights: int, fisher: bool = True) -> int:
    """Memory of the per-sample gradients of one block: float32 from torch.func plus the float64 copy iCBS keeps."""
    return int(samples * block_weights * (4 + (8 if fisher else 0)))


def available_host_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def estimate(shape: ModelShape, options: Any, probe: Probe | None = None, gpu: GPUClass | None = None,
             model: str = "") -> Plan:
    """The per-phase plan for ``options`` on ``shape``: on this machine (``probe``) or on ``gpu``."""
    if probe is None and gpu is None:
        raise ValueError("estimate needs a probe (this machine) or a GPU class")
    on_gpu = gpu is not None or str(options.device).startswith("cuda")
    wbytes = shape.dtype_bytes if on_gpu else 4  # the CPU path loads float32
    abytes = wbytes
    tokens = options.samples * options.seq_len
    batch_tokens = min(options.batch_size, options.samples) * options.seq_len
    h, f, L, P = shape.hidden, shape.intermediate, shape.layers, shape.block_params
    weights = shape.params * wbytes
    masks = L * P  # one bool per prunable weight, kept for the output
    block_weights = P * wbytes
    grams = sum(width * width * 8 for _, _, width in shape.targets)  # float64, one per linear
    widest_in = max(width for _, _, width in shape.targets)
    widest = max(out * width for _, out, width in shape.targets)
    activations = 2 * tokens * h * abytes  # a block's inputs and its outputs
    if options.match_dense:  # the dense model's stream beside the pruned one, and a cross-Gram per linear
        activations *= 2
        grams *= 2
    transient = batch_tokens * (3 * f + 4 * h) * 4 + min(options.batch_size, options.samples) * shape.heads * \
        options.seq_len ** 2 * 4  # MLP and attention intermediates of one batch
    base = probe.base_host_bytes if probe is not None else BASE_HOST_BYTES
    method = options.method
    per_block_method = P * (4 + 4 + 1) + (widest_in * widest_in * 8 * 3 if method == "sparsegpt" else 0)
    if method == "alps" or (method == "icbs" and options.init == "alps"):
        # the eigenbasis and Gram (float32, in²) and ADMM's W, V, D and their temporaries (out × in)
        per_block_method += widest_in * widest_in * 4 * 2 + widest * 4 * 8
    # iCBS holds float64 weights and row errors per tensor and a round's QUBOs (float32 B × B each,
    # with the solver's copy and answers: 3×); a round is at most ROUND_BYTES of QUBOs and at most
    # the blocks an epoch has per transformer block: 500 steps of B = 128 are 33 MB, not 256 MB
    # (the fixed 3 × 256 MB counted before made the plan 2× the measured peak on small models)
    round_bytes = min(ROUND_BYTES, max(1, _icbs_blocks(shape, options) // max(1, L)) * 4 * options.block_size ** 2)
    icbs_extra = (P * (8 + 8 + 1) + 3 * round_bytes) if method == "icbs" and options.epochs else 0
    refit_extra = (widest_in * widest_in * 8 * 3 + widest * 8 * 4) if options.refit else 0
    if options.objective != "layerwise" and method == "icbs":
        icbs_extra += fisher_block_bytes(options.samples, P)

    # --- flops of each phase
    forward_flops = L * (2 * 2 * P * tokens + 2 * 2 * tokens * options.seq_len * h)  # capture and pass-on runs
    gram_flops = L * sum(2 * width * width * tokens for width in shape.gram_inputs)
    if options.match_dense:
        # the dense stream's passes and cross-Grams, and the target solves in float64: a Cholesky
        # (in³/3) per distinct input, shared by the linears that read it, and two out × in²
        # products per tensor
        forward_flops *= MATCH_DENSE_FORWARD_FACTOR
        gram_flops *= 2
        match_f64 = L * (sum(width ** 3 / 3 for width in shape.gram_inputs)
                         + sum(4 * out * width * width for _, out, width in shape.targets))
    else:
        match_f64 = 0
    sparsegpt_flops = L * sum(width ** 3 + 2 * out * width * width for _, out, width in shape.targets) \
        if method == "sparsegpt" or options.init == "sparsegpt" else 0
    runs_alps = method == "alps" or (method == "icbs" and options.init == "alps")
    # ALPS per tensor: a float32 eigendecomposition of the Gram (~9 in³), the ADMM iterations, then
    # its own refit on the support (counted with the refit's model below)
    alps_f32 = L * sum(9 * width ** 3 + ALPS_ITERATIONS * 4 * out * width * width
                       for _, out, width in shape.targets) if runs_alps else 0
    # the refit per tensor: Cholesky and inverse of the Gram (7/3 in³) and the right-hand side
    # (2 out in²) in float64, then CG iterations of two float32 out × in² products each
    one_refit_f64 = L * sum(7 / 3 * width ** 3 + 2 * out * width * width for _, out, width in shape.targets)
    one_refit_f32 = L * sum(4 * out * width * width * refit_iterations(width) for _, out, width in shape.targets)
    refit_f64, refit_f32 = (one_refit_f64, one_refit_f32) if options.refit else (0, 0)
    # --keep-better refits inside the search phase (the initial mask's weights, then only the rows
    # the search changed) and leaves no refit phase; with ALPS's start that first refit is ALPS's own
    guard_f64, guard_f32 = 0, 0
    if options.refit and options.keep_better and method == "icbs":
        if options.init != "alps":
            guard_f64, guard_f32 = refit_f64, refit_f32
        refit_f64, refit_f32 = 0, 0
    # ALPS refits its own support inside the init phase for --method alps, and for --init alps when
    # --keep-better compares against ALPS's own result (else --init alps keeps only the mask)
    alps_refits = method == "alps" or (runs_alps and options.keep_better)
    alps_refit_f64, alps_refit_f32 = (one_refit_f64, one_refit_f32) if alps_refits else (0, 0)
    # the per-tensor error report: one float32 out × in² product per quadratic form (the dense
    # reference, the initial mask, the final one when iCBS changed it, the refit's weights)
    forms = 2 + (1 if _icbs_blocks(shape, options) else 0) + (1 if options.refit else 0)
    report_flops = L * sum(2 * out * width * width for _, out, width in shape.targets) * forms
    init_elements = L * P * 30  # scores, row sorts and masks: elementwise work (30: fitted, 12 was 2.5× under)
    # iCBS's own float64 quadratic forms: every tensor's initial row errors, then one row per block
    icbs_f64 = L * sum(2 * out * width * width for _, out, width in shape.targets) + \
        _icbs_blocks(shape, options) * 2 * sum(width * width for _, _, width in shape.targets) / len(shape.targets)
    blocks = _icbs_blocks(shape, options)
    assumptions: list[str] = []
    if gpu is None:
        assert probe is not None
        where, device = "this machine", "cpu" if not on_gpu else str(options.device)
        fwd_rate = probe.fp32_flops * EFFICIENCY["forward"]
        gram_rate = probe.fp32_flops * EFFICIENCY["gram"]
        f64_rate, elem_rate = probe.fp64_flops * 0.5, probe.copy_bytes_per_s / 4
        read_rate, write_rate = probe.read_bytes_per_s, probe.write_bytes_per_s
        block_seconds = probe.icbs_block_seconds * (options.block_size / probe.block_size) ** 2 / EFFICIENCY["icbs"]
        icbs_fixed = icbs_f64 / f64_rate
        refit_f64_rate, refit_f32_rate = probe.fp64_flops, probe.fp32_flops
        load_fixed = probe.load_fixed_seconds or FIXED_SECONDS["load"]
        assumptions.append(f"probe ({probe.seconds:.1f} s, {probe.cores} cores): float32 "
                           f"{probe.fp32_flops / 1e9:.0f} GFLOP/s, float64 {probe.fp64_flops / 1e9:.0f} GFLOP/s, "
                           f"copy {probe.copy_bytes_per_s / 1e9:.1f} GB/s, disk write {probe.write_bytes_per_s / 1e9:.1f}"
                           f" / read {probe.read_bytes_per_s / 1e9:.1f} GB/s, iCBS "
                           f"{probe.icbs_block_seconds * 1e3:.3f} ms per block of {probe.block_size}")
    else:
        where, device = f"one {gpu.name.upper()} ({gpu.memory_gib:g} GiB)", "cuda"
        fwd_rate = gpu.bf16_tflops * 1e12 * gpu.derate
        gram_rate = gpu.fp32_tflops * 1e12 * gpu.derate
        f64_rate, elem_rate = gpu.fp64_tflops * 1e12 * gpu.derate, gpu.hbm_tbs * 1e12 / 8
        read_rate, write_rate = gpu.host_read_gbs * 1e9, gpu.host_write_gbs * 1e9
        # iCBS: QUBOs built and (by auto's swap-tabu) answered on the host; `sa` on CUDA by the
        # fused kernel; scaled from B = 128 (GPU_ICBS_* above)
        per_block = GPU_ICBS_SA_BLOCK_SECONDS if options.solver == "sa" else GPU_ICBS_BLOCK_SECONDS
        block_seconds = per_block * (options.block_size / 128) ** 2
        icbs_fixed = GPU_KERNEL_COMPILE_SECONDS + L * P * GPU_ICBS_SECONDS_PER_WEIGHT
        refit_f64_rate, refit_f32_rate = f64_rate, gram_rate
        load_fixed = FIXED_SECONDS["load"] + 5.0  # importing transformers' model code on a fast host
        assumptions.append(f"{gpu.name}: bf16 {gpu.bf16_tflops:g} / fp32 {gpu.fp32_tflops:g} / fp64 "
                           f"{gpu.fp64_tflops:g} TFLOP/s, HBM {gpu.hbm_tbs:g} TB/s (datasheet), derated to "
                           f"{gpu.derate:.0%}, then scaled per phase as measured on one H100 run ("
                           + ", ".join(f"{phase} ×{factor:g}" for phase, factor in GPU_PHASE_FACTORS.items())
                           + f"); NVMe {gpu.host_read_gbs:g} GB/s read; iCBS {per_block * 1e3:.3f} ms per block"
                           f" of 128 on a {gpu.host_cores}-core host, {GPU_ICBS_SECONDS_PER_WEIGHT * 1e9:g} ns per"
                           f" prunable weight, and {GPU_KERNEL_COMPILE_SECONDS:g} s of kernel compilation on a"
                           " machine's first run")
    if tokens != options.samples * options.seq_len:  # pragma: no cover - kept explicit for readers
        pass
    assumptions.append(f"calibration: {options.samples} samples × {options.seq_len} tokens (an upper bound: short "
                       "texts are not padded to full length in the forward passes)")

    factor = (lambda phase: GPU_PHASE_FACTORS.get(phase, 1.0)) if gpu is not None else (lambda phase: 1.0)
    device_block = 0 if not on_gpu else block_weights + grams + transient + (activations if on_gpu else 0)
    dev = lambda extra: 0 if not on_gpu else device_block + extra  # noqa: E731
    host_model = base + weights
    activations_host = 0 if on_gpu else activations
    phases = [
        PhaseEstimate("load", (probe.load_host_bytes if probe is not None and probe.load_host_bytes else base) + weights,
                      0, load_fixed + weights / read_rate * EFFICIENCY["load"],
                      "safetensors read into host memory"),
        PhaseEstimate("calibrate", host_model + masks + activations_host + (0 if on_gpu else grams + transient),
                      dev(0), (forward_flops / fwd_rate + gram_flops / gram_rate) * factor("calibrate")
                      + match_f64 / f64_rate,
                      "block by block: forward passes and the float64 Grams of its inputs"),
        PhaseEstimate("init", host_model + masks + activations_host + grams + per_block_method, dev(0),
                      init_elements / elem_rate * factor("init") + sparsegpt_flops / f64_rate + alps_f32 / gram_rate
                      + (alps_refit_f64 / refit_f64_rate + alps_refit_f32 / refit_f32_rate) * factor("refit"),
                      f"{options.init if method == 'icbs' else method} masks"),
        PhaseEstimate("icbs", host_model + masks + activations_host + grams + per_block_method + icbs_extra, dev(0),
                      ((blocks * block_seconds + icbs_fixed) if blocks else 0.0)
                      + (guard_f64 / refit_f64_rate + guard_f32 / refit_f32_rate) * factor("refit"),
                      f"{blocks:,} blocks of {options.block_size}" if blocks else "not run"),
        PhaseEstimate("refit", host_model + masks + activations_host + grams + per_block_method + refit_extra,
                      dev(refit_extra), (refit_f64 / refit_f64_rate + refit_f32 / refit_f32_rate) * factor("refit"),
                      "least squares per row" if refit_f64 else
                      ("inside the search (--keep-better)" if options.refit else "off")),
        PhaseEstimate("report", host_model + masks + activations_host + grams + widest_in * widest_in * 4
                      + widest * 4 * 3, dev(widest_in * widest_in * 4 + widest * 4 * 3),
                      report_flops / gram_rate * factor("report"),
                      "relative errors per tensor (float32 on the block's device)"),
        PhaseEstimate("save", host_model + masks + weights, 0,
                      FIXED_SECONDS["save"] + (weights + masks) / write_rate * EFFICIENCY["save"],
                      "model.safetensors and masks.safetensors"),
    ]
    if probe is not None and probe.cpu_per_wall > 0:
        for phase in phases:  # load and save run on one thread: at most one CPU second per second
            share = min(1.0, probe.cpu_per_wall) if phase.phase in ("load", "save") else probe.cpu_per_wall
            phase.cpu_seconds = phase.seconds * share
    if gpu is not None and device_block > gpu.memory_gib * (1 << 30):
        assumptions.append(f"does NOT fit: one block needs {format_bytes(device_block)} of device memory")
    return Plan(model=model, shape=shape, where=where, device=device, phases=phases, assumptions=assumptions)


def format_bytes(value: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value / 1024:.0f} KiB"


def format_seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s" if value >= 0.1 else f"{value:.2f} s"


def plan_table(plan: Plan) -> str:
    """The plan as the command prints it."""
    shape = plan.shape
    lines = [f"plan for {plan.model}: {shape.model_type or 'transformer'}, {shape.params / 1e9:.2f} B parameters, "
             f"{shape.layers} blocks of {shape.block_params / 1e6:.1f} M prunable weights; on {plan.where} "
             f"(device {plan.device})",
             f"{'phase':<10} {'peak host':>11} {'peak device':>12} {'time':>9}  note"]
    for phase in plan.phases:
        device = format_bytes(phase.device_bytes) if phase.device_bytes else "-"
        lines.append(f"{phase.phase:<10} {format_bytes(phase.host_bytes):>11} {device:>12} "
                     f"{format_seconds(phase.seconds):>9}  {phase.note}")
    device = format_bytes(plan.peak_device_bytes) if plan.peak_device_bytes else "-"
    lines.append(f"{'total':<10} {format_bytes(plan.peak_host_bytes):>11} {device:>12} "
                 f"{format_seconds(plan.total_seconds):>9}")
    lines.extend(f"  assumes: {text}" for text in plan.assumptions)
    return "\n".join(lines)


def read_model_config(reference: str) -> dict[str, Any]:
    """config.json of a model folder (weights not needed) or builtin:NAME."""
    import json

    from qsurgeon.server.models.folders import model_folder

    folder = model_folder(reference)
    path = folder / "config.json" if folder.is_dir() else folder
    if not path.is_file():
        raise UsageError(f"{reference!r}: no config.json there (a model folder, with or without weights)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a JSON object")
    return config


__all__ = [
    "EFFICIENCY", "GPU_CLASSES", "GPU_PHASE_FACTORS", "GPUClass", "ModelShape", "PHASES", "Plan", "PhaseEstimate", "Probe",
    "available_host_bytes", "estimate", "fisher_block_bytes", "format_bytes", "measure_probe", "model_shape",
    "plan_table", "read_model_config",
]
